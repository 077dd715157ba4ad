r"""The built-in experiment over the size of the D_post pool: where early exposure helps.

  python main.py --config=configs/default_share.py --workdir=/tmp/share
  python main.py --config=configs/default_share.py:smoke --workdir=/tmp/share_smoke

The default's stage 1 (164K prose tokens) with λ ∈ {0, 1} and pools |D_post| ∈ {2K, 4K,
8K, 16K}, so at λ = 1 the pool is 1.2%, 2.4%, 4.8% and 9.1% of stage 1 (the paper's are
3.3% at 135M and 1.5% at 1B). Stage 2 is the default's added arm at LR 3e-3 (early
stopping every 8 steps, patience 3), stage 3 the default's learning rates; the 8K
nodes are the default's own (same ids), so a shared work directory reuses them. Each
pool is its own group in the frontier comparison and its own line in the λ figure. Like
the default it runs 3 replicates, so every pool's effects come with their intervals.
"""

from configs import default

POOLS = (2_048, 4_096, 8_192, 16_384)
POST_LR = 3e-3


def get_config(arg: str = "") -> "default.base.mlc.ConfigDict":
    smoke = arg == "smoke"
    if arg and not smoke:
        raise ValueError(
            f"configs/default_share.py: variant {arg!r} unknown; allowed: '' | 'smoke'"
        )
    c = default.get_config(arg)
    pools = (1_024, 2_048) if smoke else POOLS
    c.sweep.pretrain = (
        ("data.post_pool_tokens", pools),
        ("pretrain.exposure.lam", (0.0, 1.0)),
    )
    c.sweep.posttrain = (("posttrain.lr", (POST_LR,)),)
    return c
