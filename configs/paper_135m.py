r"""SmolLM2-135M, the paper's frontier experiments for one pipeline (D_pre = C4).

  python main.py --config=configs/paper_135m.py:musicpile-chempile --workdir=gs://BUCKET/135m-mc
  python main.py --config=configs/paper_135m.py:musicpile-chempile,dropout --workdir=gs://BUCKET/135m-mc
  python main.py --config=configs/paper_135m.py:musicpile-chempile,replay --workdir=gs://BUCKET/135m-mc
  python main.py --config=configs/paper_135m.py:musicpile-chempile,lora --workdir=gs://BUCKET/135m-mc
  python main.py --config=configs/paper_135m.py:musicpile-chempile,smoke --workdir=/tmp/s  # CPU

Argument: PIPELINE[,ARM][,smoke]. Pipelines: musicpile-chempile | musicpile-flan |
flan-chempile | flan-musicpile. Arms (each λ ∈ {0, 1}, so each holds its own unmixed
and mixed runs; run them in one work directory and they share the two pretraining runs):

  mixing    Fig. 2: stage 2 without dropout or replay            2 + 30 + 180 = 212 nodes
  dropout   Fig. 4 left, Fig. 5 left, Fig. 6 left: dropout
            {0.02, 0.05} with and without mixing                 2 + 60 + 360 = 422 nodes
  replay    Fig. 4 right, Fig. 5 right, Fig. 6 right: 1% replay
            of C4 with and without mixing                        2 + 30 + 180 = 212 nodes
  lora      Fig. 7 (Table 9): LoRA post-training, rank 64, alpha 128, LoRA dropout
            {0, .02, .05}, adapters merged before full fine-tuning; compare with
            mixing                                               2 + 90 + 540 = 632 nodes

Stage 1: 8.7B C4 tokens (+ λ·0.3B of D_post, added, spread uniformly); LR, batch and
warmup are not given for 135M, so the 1B values are used. Stage 2: LR {1e-4 … 5e-3} ×
batch {192, 480, 896}, min LR 5e-5, warmup 500, WD 0.1, to convergence with early
stopping (every 100 steps, patience 3: the 1B values; none given for 135M), at most 2B tokens.
Stage 3: 200M tokens over protocol.STAGE3_LRS (docs/science.md says why this grid). Dry run of the
mixing arm: stage 1 is 8,699,999,232 C4 tokens (+ 299,999,232 D_post at λ = 1), 7.9e18 /
8.2e18 FLOP; stage 2 at most 2B tokens, 1.8e18 FLOP per run; stage 3 199,999,488 tokens
(1,018 steps), 1.8e17 FLOP per leaf; 1.04e20 FLOP planned in all (dropout arm 1.91e20).
Produces results.jsonl and the frontier and method figures (Figs. 2, 4, 5, 6).

Memory: the loss runs in chunks of 256 positions and every stage accumulates gradients
over microbatches of at most 32 rows a device (`microbatch_rows`). On 8 × 48 GB GPUs
(data 8) stage 1's 512 rows take 2 microbatches and stage 2's batches 192 / 480 / 896
take 1 / 2 / 4; the largest, 896, compiles to 27.1 GiB a device (arguments and
temporaries, AOT on fake CPU devices, `tests/test_train.py`), an evaluation batch to 1.1.

Compiled for Cloud TPU (deviceless, libtpu; `python benchmarks/topology.py` writes this
paragraph; per device, arguments and temporaries from XLA's memory analysis, FLOPs of the
compiled matmuls, roofline from the chip's peak and HBM bandwidth):
paper_135m:musicpile-chempile on v5p-8 (v5p:2x2x1, 4 devices, 1 host(s), 95.74 GiB HBM each;
all compiled in 2355 s):
  pretrain train step, 512 rows in 4 microbatch(es): 1.54 + 13.99 GiB (arguments +
    temporaries, 16% of HBM), 127.1 TFLOP, roofline 503 ms, MFU 52%, splash attention in
    Mosaic; collectives all-reduce ×249.
  eval step, 64 rows in 1 microbatch(es): 0.51 + 1.10 GiB (arguments + temporaries, 2% of
    HBM), 5.0 TFLOP, roofline 20 ms, MFU 56%, splash attention in Mosaic; collectives all-
    reduce ×1.
  posttrain+finetune train step, 192 rows in 2 microbatch(es): 1.54 + 10.88 GiB (arguments +
    temporaries, 13% of HBM), 47.7 TFLOP, roofline 194 ms, MFU 50%, splash attention in
    Mosaic; collectives all-reduce ×125.
  posttrain train step, 480 rows in 4 microbatch(es): 1.54 + 13.20 GiB (arguments +
    temporaries, 15% of HBM), 119.2 TFLOP, roofline 476 ms, MFU 51%, splash attention in
    Mosaic; collectives all-reduce ×249.
  posttrain train step, 896 rows in 7 microbatch(es): 1.54 + 13.99 GiB (arguments +
    temporaries, 16% of HBM), 222.4 TFLOP, roofline 879 ms, MFU 52%, splash attention in
    Mosaic; collectives all-reduce ×435.
"""

from configs import base, corpora, protocol
from retention_jax import presets

M = protocol.M
MICROBATCH_ROWS = 32  # a device's rows per forward/backward: fits 48 GB (see above)


def get_config(arg: str = "musicpile-chempile") -> "base.mlc.ConfigDict":
    pipeline, arm, smoke = corpora.parse_arg(arg, tuple(corpora.PIPELINES), protocol.ARMS)
    c = protocol.settings(pipeline, smoke, presets.smollm2_135m())
    c.pretrain.tokens = 8_700 * M
    c.posttrain.update(batch=192, lr=1e-3, warmup_steps=500)
    c.finetune.batch = 192
    for stage in (c.pretrain, c.posttrain, c.finetune):
        stage.microbatch_rows = MICROBATCH_ROWS
    c.eval.batch = 64
    grid = (
        ("posttrain.lr", (1e-4, 2e-4, 5e-4, 1e-3, 5e-3)),
        ("posttrain.batch", (192, 480, 896)),
    )
    if smoke:
        protocol.shrink(c)
        grid = (("posttrain.lr", (1e-3,)), ("posttrain.batch", (8,)))
    c.sweep.posttrain = grid + protocol.arm_sweep(arm)
    return c
