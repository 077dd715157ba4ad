r"""The built-in experiment: the paper's three-stage pipeline on a laptop CPU.

  python main.py                                   # this config, ~9 minutes on 2 cores
  python main.py --config=configs/default.py:smoke --workdir=/tmp/smoke   # ~1 minute

Built-in domains stand for C4 → MusicPile → ChemPile (prose → music → chem). Stage 1
pretrains a 0.9M-parameter model with and without early exposure (λ = 0, 1) to the
music pool; stage 2 post-trains each on music over a few learning rates with early
stopping; stage 3 fine-tunes every post-trained model on chemistry over learning rates
from almost no forgetting to strong forgetting. Writes `<workdir>/results.jsonl`, the
results table and the frontier figures.
"""

from configs import base


def get_config(arg: str = "") -> "base.mlc.ConfigDict":
    c = base.get_config()
    c.data.post_pool_tokens = 100_000
    c.data.ft_pool_tokens = 100_000
    c.pretrain.tokens = 400_000
    c.posttrain.max_tokens = 300_000
    c.posttrain.early_stop.update(every=25, patience=2)
    c.finetune.tokens = 40_960
    c.sweep.pretrain = (("seed", (0,)), ("pretrain.exposure.lam", (0.0, 1.0)))
    c.sweep.posttrain = (("posttrain.lr", (1e-3, 3e-3)),)
    c.sweep.finetune = (("finetune.lr", (3e-4, 1e-3, 3e-3, 1e-2)),)
    if arg == "smoke":
        c.data.val_tokens = 4_096
        c.data.post_pool_tokens = 16_384
        c.data.ft_pool_tokens = 16_384
        c.pretrain.tokens = 65_536
        c.pretrain.warmup_steps = 4
        c.posttrain.max_tokens = 65_536
        c.posttrain.warmup_steps = 2
        c.posttrain.early_stop.every = 8
        c.finetune.tokens = 16_384
        c.finetune.warmup_steps = 2
        c.sweep.posttrain = (("posttrain.lr", (1e-3,)),)
        c.sweep.finetune = (("finetune.lr", (1e-4, 1e-2)),)
        c.ckpt.every = 16
        c.log.every = 8
    elif arg:
        raise ValueError(f"configs/default.py: variant {arg!r} unknown; allowed: '' | 'smoke'")
    return c
