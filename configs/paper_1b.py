r"""The paper's 1B model (24 layers, d_model 1728, full MHA), one pipeline (D_pre = C4).

  python main.py --config=configs/paper_1b.py:musicpile-chempile --workdir=gs://BUCKET/1b-mc
  python main.py --config=configs/paper_1b.py:musicpile-chempile,smoke --workdir=/tmp/s  # CPU

Stage 1: 19.7B C4 tokens (+ λ·0.3B, added), LR 5e-4 → 5e-5 cosine, 1,000 warmup steps,
batch 512 × 1,024. Stage 2: LR {1e-5, 2e-5, 5e-5, 1e-4, 2e-4}, batch 512, warmup 100,
early stopping every 100 steps with patience 3, at most 2B tokens; the paper's minimum
LR of 5e-5 lies above the two lowest peaks, so the minimum here is 1e-5; dropout 0
(the ablation sweeps 0.02, 0.05 with --config.sweep). Stage 3: 200M tokens over an LR
sweep. 5 × 3 = 15 leaves per λ. Produces results.jsonl and figures.
"""

from configs import base, corpora, paper_135m
from retention_jax import presets

M = 1_000_000


def get_config(arg: str = "musicpile-chempile") -> "base.mlc.ConfigDict":
    _, smoke = corpora.parse_arg(arg, tuple(corpora.PIPELINES))
    c = paper_135m.get_config(arg)
    c.model = presets.paper_1b()
    c.model.dtype = "bfloat16"
    c.model.remat = "dots"
    c.mesh = dict(data=-1, fsdp=8, tensor=1)  # FSDP within an 8-chip group, data across
    c.pretrain.update(tokens=19_700 * M, batch=512, lr=5e-4, min_lr=5e-5, warmup_steps=1_000)
    c.posttrain.update(batch=512, warmup_steps=100, min_lr=1e-5)
    c.finetune.update(batch=512)
    c.eval.batch = 512
    c.sweep.posttrain = (("posttrain.lr", (1e-5, 2e-5, 5e-5, 1e-4, 2e-4)),)
    c.sweep.finetune = (("finetune.lr", (1e-5, 5e-5, 2e-4)),)
    if smoke:
        paper_135m.shrink(c)
        c.mesh = dict(data=1, fsdp=-1, tensor=1)
        c.sweep.posttrain = (("posttrain.lr", (1e-3,)),)
    return c
