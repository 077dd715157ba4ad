"""The paper configs' graphs against the paper: node counts and token budgets per stage.

Graphs are expanded and each node's stage plan computed (`data.plan`); nothing builds a
mesh or compiles.
"""

import collections
import importlib
import math

import pytest

from configs import corpora, lambda_sweep, paper_1b, paper_135m, protocol
from retention_jax import data, experiment, graph

early_exposure = importlib.import_module("configs.1b_early_exposure")

M = 1_000_000
SEQ = 1024
POOL = 300 * M // SEQ * SEQ  # 299,999,232: pools and budgets floor to whole sequences
FT_TOKENS = 200 * M // SEQ * SEQ  # 199,999,488
N_FT = len(protocol.STAGE3_LRS)


def _counts(cfg) -> dict:
    return dict(collections.Counter(n.stage for n in experiment.expand(cfg)))


def _counts_of(pre: int, post: int, ft_per_post: int) -> dict:
    return {"pretrain": pre, "posttrain": post, "finetune": post * ft_per_post}


# (module, argument, nodes per stage): 2 λ × the stage-2 grid × the stage-3 grid.
GRAPHS = [
    *[(paper_135m, p, _counts_of(2, 2 * 15, N_FT)) for p in corpora.PIPELINES],
    *[(paper_135m, f"{p},dropout", _counts_of(2, 2 * 15 * 2, N_FT)) for p in corpora.PIPELINES],
    *[(paper_135m, f"{p},replay", _counts_of(2, 2 * 15, N_FT)) for p in corpora.PIPELINES],
    *[(paper_135m, f"{p},lora", _counts_of(2, 2 * 15 * 3, N_FT)) for p in corpora.PIPELINES],
    *[(paper_135m, f"{p},{a},smoke", _counts_of(2, 2 * {"dropout": 2, "lora": 3}.get(a, 1), 2))
      for p in corpora.PIPELINES for a in protocol.ARMS],
    *[(paper_1b, p, _counts_of(2, 2 * 5, N_FT)) for p in corpora.PIPELINES],
    *[(paper_1b, f"{p},smoke", _counts_of(2, 2, 2)) for p in corpora.PIPELINES],
    *[(early_exposure, p, _counts_of(2, 2 * 5, N_FT)) for p in early_exposure.PIPELINES],
    *[(early_exposure, f"{p},replay", _counts_of(2, 2 * 5, N_FT))
      for p in early_exposure.PIPELINES],
    (early_exposure, "musicpile-chempile,dropout", _counts_of(2, 2 * 3 * 2, N_FT)),
    (early_exposure, "musicpile-flan,dropout", _counts_of(2, 2 * 3 * 2, N_FT)),
    *[(early_exposure, f"{p},{a},smoke", _counts_of(2, 2 * (2 if a == "dropout" else 1), 2))
      for p in ("musicpile-chempile", "musicpile-flan") for a in early_exposure.ARMS],
    (lambda_sweep, "added", _counts_of(15, 15, 1)),  # 5 λ × 3 pools (Fig. 3a)
    (lambda_sweep, "compute_matched", _counts_of(15, 15, 1)),  # Fig. 3b
    (lambda_sweep, "added,lr", _counts_of(15, 45, 1)),  # + stage-2 LRs 5e-4 and 5e-3
    (lambda_sweep, "compute_matched,lr", _counts_of(15, 45, 1)),
    (lambda_sweep, "added,smoke", _counts_of(10, 10, 1)),
    (lambda_sweep, "added,lr,smoke", _counts_of(10, 30, 1)),
    (lambda_sweep, "compute_matched,smoke", _counts_of(10, 10, 1)),
]  # fmt: skip


@pytest.mark.parametrize("module, arg, counts", GRAPHS, ids=lambda v: getattr(v, "__name__", v))
def test_graph_sizes(module, arg, counts):
    c = module.get_config(arg)
    assert _counts(c) == counts
    builtin = all(c.data[d].source.startswith("builtin:") for d in ("pre", "post", "ft"))
    assert builtin == arg.endswith("smoke")


def _plans(cfg) -> list:
    return [(n, n.plan) for n in experiment.expand(cfg)]


@pytest.mark.parametrize(
    "module, arg, c4_tokens",
    [
        (paper_135m, "musicpile-chempile", 8_699_999_232),
        (paper_1b, "flan-chempile", 19_699_999_744),
    ],
)
def test_stage1_is_all_of_c4_plus_lambda_of_the_pool(module, arg, c4_tokens):
    plans = [(n, p) for n, p in _plans(module.get_config(arg)) if n.stage == "pretrain"]
    assert [n.cfg.pretrain.exposure.lam for n, _ in plans] == [0.0, 1.0]
    assert [p.tokens for _, p in plans] == [
        {"pre": c4_tokens, "post": 0, "ft": 0},
        {"pre": c4_tokens, "post": POOL, "ft": 0},  # added on top of C4
    ]
    assert c4_tokens == int(module.get_config(arg).pretrain.tokens) // SEQ * SEQ


def test_1b_settings_tables_6_and_8():
    c = early_exposure.get_config("musicpile-chempile")
    plans = _plans(c)
    pre = [p for n, p in plans if n.stage == "pretrain"]
    assert sum(pre[1].tokens.values()) == 19_999_998_976  # 19.7B C4 + 0.3B = 20B
    assert (pre[0].batch, pre[0].num_steps, pre[1].num_steps) == (512, 37_575, 38_147)
    assert (c.pretrain.lr, c.pretrain.min_lr, c.pretrain.warmup_steps) == (5e-4, 5e-5, 1_000)
    nodes = experiment.expand(c)
    assert {n.cfg.seed for n in nodes} == {42}  # stage-1 seed, swept with pretraining
    post = [(n, p) for n, p in plans if n.stage == "posttrain"]
    assert {n.cfg.posttrain.seed for n, _ in post} == {40}
    assert sorted({n.cfg.posttrain.lr for n, _ in post}) == [1e-5, 2e-5, 5e-5, 1e-4, 2e-4]
    for n, p in post:
        s = n.cfg.posttrain
        assert (s.batch, s.warmup_steps, s.min_lr, s.weight_decay, s.dropout) == (
            512,
            100,
            5e-5,  # as printed; the schedule clamps it to the peak
            0.1,
            0.0,
        )
        assert (s.early_stop.every, s.early_stop.patience) == (100, 3)
        assert (p.num_steps, p.tokens["post"]) == (3_814, 3_814 * 512 * SEQ)
        assert p.tokens["post"] <= 2_000 * M
    ft = [p for n, p in plans if n.stage == "finetune"]
    assert {p.tokens["ft"] for p in ft} == {FT_TOKENS}
    assert {p.num_steps for p in ft} == {382}
    assert c.model.tie_embeddings is False


def test_1b_dropout_ablation_table_10():
    c = early_exposure.get_config("musicpile-flan,dropout")
    post = [n for n in experiment.expand(c) if n.stage == "posttrain"]
    grid = {
        (n.cfg.pretrain.exposure.lam, n.cfg.posttrain.lr, n.cfg.posttrain.dropout) for n in post
    }
    assert grid == {
        (lam, lr, d) for lam in (0.0, 1.0) for lr in (1e-5, 2e-5, 5e-5) for d in (0.02, 0.05)
    }
    assert c.data.post.name == "musicpile"
    with pytest.raises(ValueError, match=r"'flan-chempile,dropout': the dropout ablation"):
        early_exposure.get_config("flan-chempile,dropout")
    with pytest.raises(ValueError, match=r"'flan-musicpile': expected NAME\[,ARM\]\[,smoke\]"):
        early_exposure.get_config("flan-musicpile")  # not one of the paper's 1B pipelines


def test_arms_share_pretraining_and_baselines():
    base = experiment.expand(paper_135m.get_config("musicpile-chempile"))
    for arm in ("dropout", "replay"):
        other = experiment.expand(paper_135m.get_config(f"musicpile-chempile,{arm}"))
        assert [n.id for n in other if n.stage == "pretrain"] == [
            n.id for n in base if n.stage == "pretrain"
        ]
    ablation = experiment.expand(early_exposure.get_config("musicpile-chempile,dropout"))
    plain = experiment.expand(early_exposure.get_config("musicpile-chempile"))
    # The 1B mixing arm holds the dropout-0 baseline of every ablation cell.
    baseline = {
        (n.cfg.pretrain.exposure.lam, n.cfg.posttrain.lr) for n in plain if n.stage == "posttrain"
    }
    assert [n.id for n in ablation if n.stage == "pretrain"] == [
        n.id for n in plain if n.stage == "pretrain"
    ]
    assert {(lam, lr) for lam in (0.0, 1.0) for lr in early_exposure.DROPOUT_LRS} <= baseline


def test_replay_is_one_percent_of_stage2():
    plans = _plans(paper_135m.get_config("musicpile-chempile,replay"))
    post = [p for n, p in plans if n.stage == "posttrain"]
    assert len(post) == 30
    for p in post:
        slots = p.num_steps * p.batch
        assert p.sequences["pre"] == math.floor(0.01 * slots + 0.5)
        assert p.sequences["pre"] + p.sequences["post"] == slots
        assert sum(p.tokens.values()) <= 2_000 * M


def test_fig3a_lambda_times_pool_joins_stage1():
    plans = _plans(lambda_sweep.get_config("added"))
    pre = [(n, p) for n, p in plans if n.stage == "pretrain"]
    cells = {(n.cfg.data.post_pool_tokens, n.cfg.pretrain.exposure.lam): p for n, p in pre}
    assert sorted(cells) == [
        (pool, lam) for pool in (30 * M, 150 * M, 300 * M) for lam in lambda_sweep.LAMS
    ]
    for (pool, lam), p in cells.items():
        exposed = math.floor(lam * (pool // SEQ) + 0.5)  # half up
        assert p.tokens == {"pre": 8_699_999_232, "post": exposed * SEQ, "ft": 0}
    post = [(n, p) for n, p in plans if n.stage == "posttrain"]
    assert {(n.cfg.posttrain.lr, n.cfg.posttrain.batch) for n, _ in post} == {(1e-3, 192)}
    assert {p.num_steps for _, p in post} == {2_000 * M // (192 * SEQ)}  # full cap, every λ
    ft = [n for n, _ in plans if n.stage == "finetune"]
    assert {n.cfg.finetune.lr for n in ft} == {5e-5}


def test_fig3b_one_pass_in_total():
    c = lambda_sweep.get_config("compute_matched")
    plans = _plans(c)
    by_parent = {n.id: p for n, p in plans if n.stage == "pretrain"}
    for n, p in plans:
        if n.stage != "posttrain":
            continue
        seen = by_parent[n.parent.id].tokens["post"]
        pool = n.cfg.data.post_pool_tokens // SEQ * SEQ
        assert seen + p.tokens["post"] == pool  # exactly one pass over D_post
        assert p.tokens["pre"] == 0
        if n.cfg.pretrain.exposure.lam == 1.0:
            assert p.num_steps == 0  # no stage 2 at λ = 1
    full = [
        p
        for n, p in plans
        if n.stage == "posttrain"
        and n.cfg.pretrain.exposure.lam == 0.0
        and n.cfg.data.post_pool_tokens == 300 * M
    ]
    assert full[0].num_steps == 1_526
    assert c.posttrain.warmup_fraction == pytest.approx(500 / 1_526)
    assert lambda_sweep.get_config("added").posttrain.warmup_fraction == 0.0


@pytest.mark.parametrize("setting", lambda_sweep.SETTINGS)
def test_fig3_lr_sensitivity_extends_the_main_sweep(setting, capsys):
    main = experiment.expand(lambda_sweep.get_config(setting))
    arm = experiment.expand(lambda_sweep.get_config(f"{setting},lr"))
    assert {n.id for n in main} < {n.id for n in arm}  # one work directory runs both
    post = [n for n in arm if n.stage == "posttrain"]
    assert sorted({n.cfg.posttrain.lr for n in post}) == [5e-4, 1e-3, 5e-3]
    assert {n.cfg.posttrain.batch for n in post} == {192}
    print(graph.plan_table(arm))
    assert "105 nodes" in capsys.readouterr().out  # the dry run shows the arm's cost


def test_stage3_grid_spans_the_forgetting_range_and_holds_fig3_lr():
    lrs = protocol.STAGE3_LRS
    assert lrs == tuple(sorted(lrs)) and lrs[0] == 1e-6 and lrs[-1] == 1e-3
    assert 5e-5 in lrs  # the paper's Fig. 3 stage-3 LR
    for module, arg in ((paper_135m, "flan-musicpile"), (early_exposure, "musicpile-flan")):
        ft = [n for n in experiment.expand(module.get_config(arg)) if n.stage == "finetune"]
        assert sorted({n.cfg.finetune.lr for n in ft}) == list(lrs)
        assert {data.plan("finetune", n.exp).tokens["ft"] for n in ft[:3]} == {FT_TOKENS}


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"config argument 'musicpile-chempile,qlora'"):
        paper_135m.get_config("musicpile-chempile,qlora")
    with pytest.raises(ValueError, match=r"ARM one of \['mixing', 'dropout', 'replay', 'lora'\]"):
        paper_135m.get_config("musicpile-chempile,dropout,replay")
    with pytest.raises(
        ValueError, match=r"'added,replay': expected NAME\[,ARM\]\[,smoke\]; .* \['main', 'lr'\]"
    ):
        lambda_sweep.get_config("added,replay")


def test_fig7_lora_arm_follows_table_9():
    c = paper_135m.get_config("musicpile-chempile,lora")
    post = [n for n in experiment.expand(c, 32) if n.stage == "posttrain"]
    loras = {n.exp.posttrain.lora for n in post}
    assert {(x.rank, x.alpha, x.dropout) for x in loras} == {
        (64, 128.0, d) for d in (0.0, 0.02, 0.05)
    }
    assert {x.targets for x in loras} == {("o", "gate", "up", "down", "head")}  # no q, k, v
    assert {n.exp.posttrain.optimizer.lr for n in post} == {1e-4, 2e-4, 5e-4, 1e-3, 5e-3}
    ft = next(n for n in experiment.expand(c, 32) if n.stage == "finetune")
    assert ft.exp.model_for("finetune").lora.rank == 0  # full fine-tuning of merged weights
    assert not ft.exp.model_for("finetune").tie_embeddings  # the merged head adapter unties
