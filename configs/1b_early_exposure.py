r"""The paper's 1B early-exposure experiments (Figs. 8-12, Table 10) on its three 1B pipelines.

  python main.py --config=configs/1b_early_exposure.py:musicpile-chempile --workdir=gs://BUCKET/1b
  python main.py --config=configs/1b_early_exposure.py:musicpile-chempile,dropout --workdir=gs://BUCKET/1b
  python main.py --config=configs/1b_early_exposure.py:musicpile-chempile,replay --workdir=gs://BUCKET/1b
  python main.py --config=configs/1b_early_exposure.py:musicpile-chempile,smoke --workdir=/tmp/s
  python main.py --config=configs/1b_early_exposure.py:musicpile-chempile --workdir=/tmp/p --dry_run

Argument: PIPELINE[,ARM][,smoke] (smoke: a CPU run of the same graph on built-in data);
pipelines musicpile-chempile | musicpile-flan | flan-chempile (the ones the paper ran at
1B). Settings of configs/paper_1b.py (Tables 6
and 8: stage-1 seed 42, stage-2 seed 40), λ ∈ {0, 1}. Arms (one work directory per
pipeline: the arms share its two pretraining runs and the dropout arm's baseline):

  mixing    Figs. 8-9: unmixed vs mixed frontiers, stage-2 LR {1e-5 … 2e-4}, dropout 0
  dropout   Table 10 (MusicPile pipelines only): λ {0, 1} × stage-2 LR {1e-5, 2e-5,
            5e-5} × dropout {0.02, 0.05}
  replay    Figs. 10-12: the mixing grid with 1% replay of C4

Plan of one pipeline's mixing arm (`--dry_run`, graph.plan_table): 2 + 10 + 60 = 72
nodes, 4.25e20 FLOP planned in all (an upper bound: stage 2 counted at its 2B cap), ≈ 298
H100 device-hours at 40% MFU (`--dry_run` prints the estimate).
Stage 1: 19,699,999,744 C4 tokens (+ 299,999,232 D_post at λ = 1), 37,575 / 38,147 steps,
1.17e20 / 1.18e20 FLOP per run. Stage 2: at most 1,999,634,432 tokens (3,814 steps of
512 × 1,024; early stopping ends it sooner), 1.18e19 FLOP per run. Stage 3: 199,999,488
tokens (382 steps), 1.18e18 FLOP per leaf. Dropout arm: 2 + 12 + 72 = 86 nodes, 4.63e20
FLOP; replay arm: 2 + 10 + 60 = 72 nodes, 4.25e20 FLOP (1% of stage 2 is C4).

Compiled for Cloud TPU (deviceless, libtpu; `python benchmarks/topology.py` writes this
paragraph; per device, arguments and temporaries from XLA's memory analysis, FLOPs of the
compiled matmuls, roofline from the chip's peak and HBM bandwidth):
1b_early_exposure:musicpile-chempile,dropout on v5p-64 (v5p:2x4x4, 32 devices, 8 host(s),
95.74 GiB HBM each; all compiled in 962 s):
  pretrain+finetune train step, 512 rows in 2 microbatch(es): 1.51 + 10.24 GiB (arguments +
    temporaries, 12% of HBM), 99.8 TFLOP, roofline 218 ms, MFU 97%, splash attention in
    Mosaic; collectives all-gather ×692, all-reduce ×403, all-to-all ×2, collective-permute
    ×144.
  eval step, 512 rows in 1 microbatch(es): 0.50 + 0.98 GiB (arguments + temporaries, 2% of
    HBM), 32.4 TFLOP, roofline 70 ms, MFU 100%, splash attention in Mosaic; collectives all-
    gather ×173, all-reduce ×26.
  posttrain train step, 512 rows in 2 microbatch(es): 1.51 + 12.07 GiB (arguments +
    temporaries, 14% of HBM), 106.8 TFLOP, roofline 321 ms, MFU 66%, einsum_vjp attention;
    collectives all-gather ×692, all-reduce ×403, all-to-all ×2, collective-permute ×144.
  eval step, 512 rows in 1 microbatch(es): 0.50 + 4.29 GiB (arguments + temporaries, 5% of
    HBM), 33.7 TFLOP, roofline 96 ms, MFU 74%, einsum_vjp attention; collectives all-gather
    ×173, all-reduce ×26.
  posttrain train step, 512 rows in 2 microbatch(es): 1.51 + 12.07 GiB (arguments +
    temporaries, 14% of HBM), 106.8 TFLOP, roofline 321 ms, MFU 66%, einsum_vjp attention;
    collectives all-gather ×692, all-reduce ×403, all-to-all ×2, collective-permute ×144.
  eval step, 512 rows in 1 microbatch(es): 0.50 + 4.29 GiB (arguments + temporaries, 5% of
    HBM), 33.7 TFLOP, roofline 96 ms, MFU 74%, einsum_vjp attention; collectives all-gather
    ×173, all-reduce ×26.
"""

from configs import base, corpora, paper_1b, protocol

PIPELINES = ("musicpile-chempile", "musicpile-flan", "flan-chempile")
ARMS = ("mixing", "dropout", "replay")
DROPOUT_LRS = (1e-5, 2e-5, 5e-5)  # Table 10


def get_config(arg: str = "musicpile-chempile") -> "base.mlc.ConfigDict":
    pipeline, arm, smoke = corpora.parse_arg(arg, PIPELINES, ARMS)
    if arm == "dropout" and corpora.PIPELINES[pipeline][0] != "musicpile":
        raise ValueError(
            f"config argument {arg!r}: the dropout ablation (Table 10) post-trains on "
            f"MusicPile; allowed pipelines: {[p for p in PIPELINES if p.startswith('music')]}"
        )
    c = paper_1b.get_config(pipeline + (",smoke" if smoke else ""))
    if arm == "dropout":
        lrs = (("posttrain.lr", (1e-3,)),) if smoke else (("posttrain.lr", DROPOUT_LRS),)
        c.sweep.posttrain = lrs + protocol.arm_sweep("dropout")
    else:
        c.sweep.posttrain = tuple(c.sweep.posttrain) + protocol.arm_sweep(arm)
    return c
