r"""Fig. 3 at 135M: L_im and L_ret against λ for |D_post| ∈ {30M, 150M, 300M}.

  python main.py --config=configs/lambda_sweep.py:added --workdir=gs://BUCKET/fig3a
  python main.py --config=configs/lambda_sweep.py:compute_matched --workdir=gs://BUCKET/fig3b
  python main.py --config=configs/lambda_sweep.py:added,lr --workdir=gs://BUCKET/fig3a
  python main.py --config=configs/lambda_sweep.py:compute_matched,lr --workdir=gs://BUCKET/fig3b
  python main.py --config=configs/lambda_sweep.py:added,smoke --workdir=/tmp/s   # CPU

C4 → MusicPile → ChemPile, λ ∈ {0, 0.25, 0.5, 0.75, 1}: 5 λ × 3 pools = 15 pretraining
runs, each with one stage-2 run and one stage-3 leaf (45 nodes). "added" (Fig. 3a):
λ·|D_post| tokens join stage 1 on top of C4, stage 2 runs to convergence on the whole
pool. "compute_matched" (Fig. 3b): one pass over the pool in total, λ of it in stage 1
and the disjoint rest as a single stage-2 pass (at λ = 1 stage 2 has no steps). One
stage-2 setting for every λ (LR 1e-3, batch 192; the paper names none), so the curves
compare λ alone. Compute-matched stage 2 warms up over a fixed share of its length
(`posttrain.warmup_fraction`: the paper's 500 steps at λ = 0, |D_post| = 300M, i.e.
500 / 1,526), so its schedule has one shape at every λ and pool. Stage 3 at LR 5e-5 as
in the paper's figure. Produces results.jsonl and the λ figure (the paper's values
drawn beside).

Arm `lr` (sensitivity): the same sweep at stage-2 LRs 5e-4 and 5e-3 as well, 1e-3's
neighbours in the paper's grid, so a reader can see whether the λ curves depend on the
stage-2 setting (one figure per setting). Run into the main sweep's work directory, it
reuses the 15 pretraining runs and the 1e-3 nodes and adds 30 stage-2 runs and 30 leaves.
Planned cost (`--dry_run`, H100 at 40% MFU, training only): added 45 nodes, 1.50e20 FLOP,
≈ 106 device-hours; with `lr` 105 nodes, 2.11e20 FLOP, ≈ 148 (+42; stage 2 counted at its
2B-token cap, an upper bound, since early stopping ends it sooner). Compute-matched: ≈ 87,
and ≈ 93 with `lr` (+5: one pass over the rest of each pool).
"""

import math

import ml_collections as mlc

from configs import corpora, paper_135m

M = 1_000_000
SETTINGS = ("added", "compute_matched")
ARMS = ("main", "lr")
LAMS = (0.0, 0.25, 0.5, 0.75, 1.0)
LR_FACTORS = (0.5, 1.0, 5.0)  # arm `lr`: stage-2 LRs 5e-4, 1e-3, 5e-3 (smoke: the same ratios)


def get_config(arg: str = "added") -> mlc.ConfigDict:
    setting, arm, smoke = corpora.parse_arg(arg, SETTINGS, ARMS)
    c = paper_135m.get_config("musicpile-chempile,smoke" if smoke else "musicpile-chempile")
    c.posttrain.compute_matched = setting == "compute_matched"
    pools = (4_096, 8_192) if smoke else (30 * M, 150 * M, 300 * M)
    if c.posttrain.compute_matched:
        c.posttrain.warmup_fraction = c.posttrain.warmup_steps / _full_pass_steps(c, pools[-1])
    c.sweep.pretrain = (
        ("data.post_pool_tokens", pools),
        ("pretrain.exposure.lam", LAMS),
    )
    factors = LR_FACTORS if arm == "lr" else (1.0,)
    c.sweep.posttrain = (("posttrain.lr", tuple(f * c.posttrain.lr for f in factors)),)
    c.sweep.finetune = (("finetune.lr", (1e-4 if smoke else 5e-5,)),)
    return c


def _full_pass_steps(c, pool_tokens: int) -> int:
    """Steps of the compute-matched stage 2 at λ = 0: one pass over the pool's whole
    sequences, the last batch partial (this sweep replays nothing: posttrain.replay = 0)."""
    if c.posttrain.replay:
        raise ValueError("configs/lambda_sweep.py: the warmup share assumes posttrain.replay=0")
    return math.ceil(pool_tokens // c.data.seq_len / c.posttrain.batch)
