r"""SmolLM2-135M, the paper's Fig. 2 / Fig. 4 sweep for one pipeline (D_pre = C4).

  python main.py --config=configs/paper_135m.py:musicpile-chempile --workdir=gs://BUCKET/135m-mc
  python main.py --config=configs/paper_135m.py:musicpile-chempile,smoke --workdir=/tmp/s  # CPU

Pipelines: musicpile-chempile | musicpile-flan | flan-chempile | flan-musicpile.
Stage 1: ~8.7B C4 tokens (+ λ·0.3B MusicPile/FLAN, added); λ ∈ {0, 1}. Stage 2: LR
{1e-4 … 5e-3} × batch {192, 480, 896} × dropout {0, .02, .05}, warmup 500, WD 0.1, to
convergence with early stopping, at most 2B tokens. Stage 3: 200M tokens over an LR
sweep. Stage-1 LR and batch are not given by the paper (the 1B values are used).
Produces results.jsonl, the frontier and methods figures.
"""

from configs import base, corpora
from retention_jax import presets

M = 1_000_000


def get_config(arg: str = "musicpile-chempile") -> "base.mlc.ConfigDict":
    pipeline, smoke = corpora.parse_arg(arg, tuple(corpora.PIPELINES))
    c = base.get_config()
    corpora.set_pipeline(c, pipeline, smoke)
    c.model = presets.smollm2_135m()
    c.model.dtype = "bfloat16"
    c.model.remat = "dots"
    c.data.tokenizer = "hf:HuggingFaceTB/SmolLM2-135M"
    c.data.seq_len = 1024
    c.data.post_pool_tokens = 300 * M
    c.data.ft_pool_tokens = 300 * M
    c.data.val_tokens = 2 * M
    c.pretrain.update(tokens=8_700 * M, batch=512, lr=5e-4, min_lr=5e-5, warmup_steps=1_000)
    c.posttrain.update(batch=192, max_tokens=2_000 * M, lr=1e-3, min_lr=5e-5, warmup_steps=500)
    c.posttrain.early_stop.update(every=100, patience=3)
    c.finetune.update(tokens=200 * M, batch=192, lr=5e-5, min_lr=0.0, warmup_steps=100)
    c.eval.batch = 64
    c.ckpt.every = 1_000
    c.log.every = 50
    c.sweep.pretrain = (("seed", (0,)), ("pretrain.exposure.lam", (0.0, 1.0)))
    c.sweep.posttrain = (
        ("posttrain.lr", (1e-4, 2e-4, 5e-4, 1e-3, 5e-3)),
        ("posttrain.batch", (192, 480, 896)),
        ("posttrain.dropout", (0.0, 0.02, 0.05)),
    )
    c.sweep.finetune = (("finetune.lr", (1e-5, 5e-5, 2e-4, 1e-3)),)
    if smoke:
        shrink(c)
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
    c.sweep.posttrain = (
        ("posttrain.lr", (1e-3,)),
        ("posttrain.batch", (8,)),
        ("posttrain.dropout", (0.0, 0.05)),
    )
    c.sweep.finetune = (("finetune.lr", (1e-4, 1e-2)),)
