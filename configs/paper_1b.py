r"""The paper's 1B settings (Tables 6 and 8) for any pipeline (D_pre = C4).

  python main.py --config=configs/paper_1b.py:flan-musicpile --workdir=gs://BUCKET/1b-fm
  python main.py --config=configs/paper_1b.py:flan-musicpile,smoke --workdir=/tmp/s  # CPU

The paper's own 1B experiments (its three 1B pipelines, the dropout ablation, replay)
are configs/1b_early_exposure.py, built on this file. Model: 24 layers, d_model 1728,
full MHA, untied head (1,029,917,376 parameters). Stage 1: 19.7B C4 tokens (+ λ·0.3B,
added), LR 5e-4 → 5e-5 cosine, 1,000 warmup steps, batch 512 × 1,024, seed 42. Stage 2:
LR {1e-5, 2e-5, 5e-5, 1e-4, 2e-4}, minimum 5e-5 as printed (clamped to the peak where
it lies above it, so the 1e-5 and 2e-5 runs hold their peak after warmup), batch 512,
warmup 100, WD 0.1, early stopping every 100 steps with patience 3, at most 2B tokens,
seed 40 (`posttrain.seed`). Stage 3: 200M tokens over protocol.STAGE3_LRS.
2 + 10 + 60 = 72 nodes per pipeline.

Memory: the loss runs in chunks of 256 positions, and every stage accumulates gradients
over microbatches of at most 8 rows a device (`microbatch_rows`): 8 microbatches on 8
devices, none on a 256-chip slice (2 rows a chip), 64 on one device. Compiled per-device
memory (XLA's memory analysis, AOT on fake CPU devices; bf16, remat dots, rolled layer
scan; `tests/test_train.py`):
  8 × 48 GB GPUs (fsdp 8, as set): train step 1.44 GiB arguments + 20.1 GiB
    temporaries, evaluation batch 0.48 + 4.0 GiB.
  one 141 GB GPU (H200): --config.mesh.fsdp=1 and, for fewer and larger microbatches,
    --config.{pretrain,posttrain,finetune}.microbatch_rows=32 (16 microbatches): train
    step 11.5 + 86.4 GiB, evaluation batch 3.8 + 30.4 GiB.

Compiled for Cloud TPU (deviceless, libtpu; `python benchmarks/topology.py` writes this
paragraph; per device, arguments and temporaries from XLA's memory analysis, FLOPs of the
compiled matmuls, roofline from the chip's peak and HBM bandwidth):
paper_1b:musicpile-chempile on v5p-64 (v5p:2x4x4, 32 devices, 8 host(s), 95.74 GiB HBM each;
all compiled in 583 s):
  pretrain+posttrain+finetune train step, 512 rows in 2 microbatch(es): 1.51 + 10.24 GiB
    (arguments + temporaries, 12% of HBM), 99.8 TFLOP, roofline 218 ms, MFU 97%, splash
    attention in Mosaic; collectives all-gather ×692, all-reduce ×403, all-to-all ×2,
    collective-permute ×144.
  eval step, 512 rows in 1 microbatch(es): 0.50 + 0.98 GiB (arguments + temporaries, 2% of
    HBM), 32.4 TFLOP, roofline 70 ms, MFU 100%, splash attention in Mosaic; collectives all-
    gather ×173, all-reduce ×26.
paper_1b:musicpile-chempile on v5litepod-64 (v5e:8x8, 64 devices, 16 host(s), 15.75 GiB HBM
each; all compiled in 1138 s):
  pretrain+posttrain+finetune train step, 512 rows in 1 microbatch(es): 1.51 + 8.34 GiB
    (arguments + temporaries, 63% of HBM), 49.9 TFLOP, roofline 453 ms, MFU 54%, splash
    attention in Mosaic; collectives all-gather ×1113, all-reduce ×202, collective-permute
    ×72.
  eval step, 512 rows in 1 microbatch(es): 0.50 + 0.74 GiB (arguments + temporaries, 8% of
    HBM), 16.2 TFLOP, roofline 111 ms, MFU 74%, splash attention in Mosaic; collectives all-
    gather ×461, all-reduce ×26.
"""

from configs import base, corpora, protocol
from retention_jax import presets

M = protocol.M
STAGE2_LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4)
PRETRAIN_SEED, POSTTRAIN_SEED = 42, 40
MICROBATCH_ROWS = 8  # a device's rows per forward/backward: fits 48 GB (see above)


def get_config(arg: str = "musicpile-chempile") -> "base.mlc.ConfigDict":
    pipeline, _, smoke = corpora.parse_arg(arg, tuple(corpora.PIPELINES))
    c = protocol.settings(pipeline, smoke, presets.paper_1b())
    c.mesh = dict(data=-1, fsdp=8, tensor=1)  # FSDP within an 8-chip group, data across
    c.pretrain.tokens = 19_700 * M
    c.posttrain.update(batch=512, warmup_steps=100, seed=POSTTRAIN_SEED)
    c.finetune.batch = 512
    for stage in (c.pretrain, c.posttrain, c.finetune):
        stage.microbatch_rows = MICROBATCH_ROWS
    c.eval.batch = 512
    c.seed = PRETRAIN_SEED
    c.sweep.posttrain = (("posttrain.lr", STAGE2_LRS),)
    if smoke:
        protocol.shrink(c)
        c.mesh = dict(data=1, fsdp=-1, tensor=1)
        c.sweep.posttrain = (("posttrain.lr", (1e-3,)),)
    return c
