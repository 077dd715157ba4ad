r"""Fig. 3 at 135M: L_im and L_ret against λ for |D_post| ∈ {30M, 150M, 300M}.

  python main.py --config=configs/lambda_sweep.py:added --workdir=gs://BUCKET/fig3a
  python main.py --config=configs/lambda_sweep.py:compute_matched --workdir=gs://BUCKET/fig3b
  python main.py --config=configs/lambda_sweep.py:added,smoke --workdir=/tmp/s   # CPU

C4 → MusicPile → ChemPile. "added" (Fig. 3a): λ·|D_post| tokens join stage 1 on top of
C4, stage 2 runs to convergence on the whole pool. "compute_matched" (Fig. 3b): one pass
over the pool in total, λ of it in stage 1 and the disjoint rest as a single stage-2
pass (at λ = 1 there is no stage 2). Stage 3 at LR 5e-5 as in the paper's figure.
Produces results.jsonl and the λ figure (with the paper's values drawn beside).
"""

from configs import base, corpora, paper_135m

M = 1_000_000
SETTINGS = ("added", "compute_matched")


def get_config(arg: str = "added") -> "base.mlc.ConfigDict":
    setting, smoke = corpora.parse_arg(arg, SETTINGS)
    c = paper_135m.get_config("musicpile-chempile,smoke" if smoke else "musicpile-chempile")
    c.posttrain.compute_matched = setting == "compute_matched"
    pools = (30 * M, 150 * M, 300 * M)
    if smoke:
        pools = (4_096, 8_192)
    c.sweep.pretrain = (
        ("seed", (0,)),
        ("data.post_pool_tokens", pools),
        ("pretrain.exposure.lam", (0.0, 0.25, 0.5, 0.75, 1.0)),
    )
    c.sweep.posttrain = (("posttrain.lr", (c.posttrain.lr,)),)
    c.sweep.finetune = (("finetune.lr", (1e-4 if smoke else 5e-5,)),)
    return c
