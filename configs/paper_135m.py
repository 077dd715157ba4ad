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
Stage 3: 200M tokens over STAGE3_LRS (docs/science.md says why this grid). Dry run of the
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

from configs import base, corpora
from retention_jax import presets

M = 1_000_000
ARMS = ("mixing", "dropout", "replay", "lora")
# Stage-3 LRs from almost no change (Adam moves a weight by about lr per step: 1e-6 over
# ~1,000 steps is 5% of the init scale) to strong forgetting (above most stage-2 peaks).
STAGE3_LRS = (1e-6, 3e-6, 1e-5, 5e-5, 2e-4, 1e-3)
REPLAY = 0.01  # share of stage-2 sequences drawn from D_pre
DROPOUTS = (0.02, 0.05)
LORA_RANK = 64  # alpha 128 (alpha/rank 2); targets o, gate, up, down, head (no q, k, v)
LORA_DROPOUTS = (0.0, 0.02, 0.05)
MICROBATCH_ROWS = 32  # a device's rows per forward/backward: fits 48 GB (see above)


def arm_sweep(arm: str) -> tuple:
    """The posttrain sweep pairs an arm adds to the stage-2 grid."""
    return {
        "mixing": (),
        "dropout": (("posttrain.dropout", DROPOUTS),),
        "replay": (("posttrain.replay", (REPLAY,)),),
        "lora": (("posttrain.lora.rank", (LORA_RANK,)), ("posttrain.lora.dropout", LORA_DROPOUTS)),
    }[arm]


def get_config(arg: str = "musicpile-chempile") -> "base.mlc.ConfigDict":
    pipeline, arm, smoke = corpora.parse_arg(arg, tuple(corpora.PIPELINES), ARMS)
    c = base.get_config()
    corpora.set_pipeline(c, pipeline, smoke)
    c.model = presets.smollm2_135m()
    c.model.dtype = "bfloat16"
    c.model.remat = "dots"
    c.model.loss_chunk = 256
    c.data.tokenizer = "hf:HuggingFaceTB/SmolLM2-135M"
    c.data.seq_len = 1024
    c.data.read_threads = 4  # prefetch batches while the accelerator steps
    c.data.post_pool_tokens = 300 * M
    c.data.ft_pool_tokens = 300 * M
    c.data.val_tokens = 2 * M
    c.pretrain.update(tokens=8_700 * M, batch=512, lr=5e-4, min_lr=5e-5, warmup_steps=1_000)
    c.posttrain.update(batch=192, max_tokens=2_000 * M, lr=1e-3, min_lr=5e-5, warmup_steps=500)
    c.posttrain.early_stop.update(every=100, patience=3)
    c.finetune.update(tokens=200 * M, batch=192, lr=5e-5, min_lr=0.0, warmup_steps=100)
    for stage in (c.pretrain, c.posttrain, c.finetune):
        stage.microbatch_rows = MICROBATCH_ROWS
    c.eval.batch = 64
    c.ckpt.every = 1_000
    c.log.every = 50
    c.sweep.pretrain = (("pretrain.exposure.lam", (0.0, 1.0)),)
    grid = (
        ("posttrain.lr", (1e-4, 2e-4, 5e-4, 1e-3, 5e-3)),
        ("posttrain.batch", (192, 480, 896)),
    )
    c.sweep.finetune = (("finetune.lr", STAGE3_LRS),)
    if smoke:
        shrink(c)
        grid = (("posttrain.lr", (1e-3,)), ("posttrain.batch", (8,)))
    c.sweep.posttrain = grid + arm_sweep(arm)
    return c


def shrink(c) -> None:
    """Same graph shape, CPU sizes: tiny model, byte tokenizer, built-in data."""
    c.model = presets.tiny()
    c.data.tokenizer = "byte"
    c.data.seq_len = 64
    c.data.update(post_pool_tokens=8_192, ft_pool_tokens=8_192, val_tokens=2_048)
    c.pretrain.update(tokens=16_384, batch=8, warmup_steps=2)
    c.posttrain.update(batch=8, max_tokens=8_192, warmup_steps=2)
    c.posttrain.early_stop.update(every=4, patience=2)
    c.finetune.update(tokens=4_096, batch=8, warmup_steps=1)
    c.eval.batch = 8
    c.ckpt.every = 8
    c.log.every = 4
    c.sweep.finetune = (("finetune.lr", (1e-4, 1e-2)),)
