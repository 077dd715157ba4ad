"""Config validation: every bad value is named with its key and what is allowed."""

import dataclasses
import re

import pytest

from configs import base, corpora, default, lambda_sweep, paper_1b, paper_135m
from retention_jax import config, data, errors, graph

# (config module, argument, devices it is validated for, nodes in its graph)
SHIPPED = [
    (default, "", 8, 3 * (3 + 9 + 36)),  # 3 replicates
    (default, "smoke", 8, 3 + 6 + 12),
    *[(paper_135m, p, 32, 2 + 30 + 180) for p in corpora.PIPELINES],
    *[(paper_135m, p + ",smoke", 8, 2 + 2 + 4) for p in corpora.PIPELINES],
    *[(paper_1b, p, 256, 2 + 10 + 60) for p in corpora.PIPELINES],
    *[(paper_1b, p + ",smoke", 8, 2 + 2 + 4) for p in corpora.PIPELINES],
    (lambda_sweep, "added", 32, 15 * 3),
    (lambda_sweep, "compute_matched,smoke", 8, 10 * 3),
]


@pytest.mark.parametrize("module, arg, devices, nodes", SHIPPED)
def test_shipped_configs_validate_and_expand(module, arg, devices, nodes):
    c = module.get_config(arg) if arg else module.get_config()
    config.parse(c, devices)
    nodes_ = graph.expand(c, devices)  # parses and validates every node
    assert len(nodes_) == nodes
    if arg.endswith("smoke") or module is default:  # runs here: built-in data only
        for d in ("pre", "post", "ft"):
            assert c.data[d].source.startswith("builtin:")


@pytest.mark.parametrize(
    "path, value, message",
    [
        (
            "model.n_kv_heads",
            3,
            "config key model.n_kv_heads=3: a divisor of model.n_heads=4",
        ),
        ("model.dtype", "float16", "config key model.dtype='float16': float32 | bfloat16"),
        ("model.remat", "some", "config key model.remat='some': none | full | dots"),
        ("model.dropout.attn", 1.0, "model.dropout.attn=1.0"),
        ("posttrain.lora.targets", ("q", "qkv"), "config key posttrain.lora.targets=('q', 'qkv')"),
        ("posttrain.lora.rank", -8, "config key posttrain.lora.rank=-8: an integer >= 0"),
        ("pretrain.decay_exclude", ("norm", 3), "pretrain.decay_exclude=('norm', 3)"),
        (
            "pretrain.batch",
            6,
            "config key pretrain.batch=6: a multiple of mesh data×fsdp=8",
        ),
        ("posttrain.lr", -1.0, "posttrain.lr=-1.0"),
        ("finetune.min_lr", 2.0, "config key finetune.min_lr=2.0: a number in [0, 1]"),
        (
            "posttrain.warmup_steps",
            -5,
            "config key posttrain.warmup_steps=-5: an integer >= 0",
        ),
        ("posttrain.dropout", 1.2, "posttrain.dropout=1.2"),
        ("posttrain.early_stop.patience", -1, "posttrain.early_stop.patience=-1"),
        ("eval.batch", 12, "eval.batch=12"),
        ("seed", -3, "config key seed=-3: an integer in [0, 2**32)"),
        ("seed", 2**32, "config key seed=4294967296: an integer in [0, 2**32)"),  # aliases 0
        ("posttrain.seed", 2**40, "config key posttrain.seed=1099511627776: an integer in"),
        ("data.seed", -2, "config key data.seed=-2: an integer in [0, 2**32)"),
        ("mesh.tensor", 3, "mesh"),
    ],
)
def test_bad_values_are_named(path, value, message):
    c = base.get_config()
    *head, last = path.split(".")
    node = c
    for key in head:
        node = node[key]
    node[last] = value
    with pytest.raises(errors.ConfigError, match=re.escape(message)):
        config.parse(c, 8)


def test_bad_sweeps_are_named():
    c = base.get_config()
    c.sweep.posttrain = (("posttrain.learning_rate", (1e-3,)),)
    with pytest.raises(ValueError, match="sweep.posttrain='posttrain.learning_rate'"):
        graph.expand(c, 8)
    c = base.get_config()
    c.sweep.finetune = (("finetune.lr", ()),)
    with pytest.raises(ValueError, match="sweep.finetune.finetune.lr"):
        graph.expand(c, 8)
    c = base.get_config()
    c.sweep.finetune = (("finetune.lr",),)
    with pytest.raises(ValueError, match="sweep.finetune"):
        graph.expand(c, 8)
    c = base.get_config()
    c.sweep.finetune = (("pretrain.exposure.lam", (0.0, 1.0)),)
    with pytest.raises(ValueError, match=r"sweep.finetune='pretrain.exposure.lam'.*finetune\."):
        graph.expand(c, 8)


@pytest.mark.parametrize(
    "stage, path",
    [("pretrain", "seed"), ("pretrain", "data.seed"), ("posttrain", "posttrain.seed")],
)
def test_seeds_are_set_by_replicates_never_swept(stage, path):
    c = base.get_config()
    c.sweep[stage] = ((path, (0, 1)),)
    with pytest.raises(ValueError, match=rf"sweep.{stage}='{path}': no seed: replicates=N"):
        graph.expand(c, 8)


def test_replicates_copy_the_graph_with_paired_seeds():
    c = base.get_config()  # 2 λ x 1 stage-2 LR x 2 stage-3 LRs: 8 nodes a replicate
    c.posttrain.seed = 7
    c.replicates = 3
    nodes = graph.expand(c, 8)
    assert len(nodes) == 24
    assert [n.stage for n in nodes] == sorted((n.stage for n in nodes), key=config.STAGES.index)
    for n in nodes:
        r = n.replicate
        assert n.parent is None or n.parent.replicate == r
        assert (n.exp.seed, n.exp.data.seed, n.exp.posttrain.seed) == (r, r, 7 + r)
    one = base.get_config()
    one.posttrain.seed = 7
    first = [n.id for n in graph.expand(one, 8)]
    assert [n.id for n in nodes if n.replicate == 0] == first  # replicate 0 is the config
    c.replicate_pools = False
    assert {n.exp.data.seed for n in graph.expand(c, 8)} == {0}


@pytest.mark.parametrize(
    "key, value, allowed",
    [("replicates", 0, "an integer >= 1"), ("replicates", -2, "an integer >= 1")],
)
def test_bad_replicates_are_named(key, value, allowed):
    c = base.get_config()
    c[key] = value
    with pytest.raises(errors.ConfigError, match=rf"config key {key}={value}: {allowed}"):
        graph.expand(c, 8)


def test_bad_rules_are_named():
    c = base.get_config()
    c.rules = (("embed", "fsdp"), ("mlp", "model"))
    with pytest.raises(ValueError, match=r"rules=\('mlp', 'model'\)"):
        graph.expand(c, 8)


def test_linked_sweep_keys_change_together():
    c = default.get_config("smoke")
    c.sweep.posttrain = (
        ("posttrain.lr", (1e-3, 3e-3)),
        (("posttrain.compute_matched", "posttrain.warmup_fraction"), ((False, 0.0), (True, 0.25))),
    )
    post = [n for n in graph.expand(c, 8) if n.stage == "posttrain"]
    assert len(post) == 3 * 2 * 2  # three pretraining nodes × lr × the linked pair
    assert {
        (n.exp.posttrain.compute_matched, n.exp.posttrain.optimizer.warmup_fraction) for n in post
    } == {(False, 0.0), (True, 0.25)}
    assert post[1].swept == {
        "posttrain.lr": 1e-3,
        "posttrain.compute_matched": True,
        "posttrain.warmup_fraction": 0.25,
    }
    c.sweep.posttrain = ((("posttrain.lr", "posttrain.dropout"), ((1e-3,),)),)
    with pytest.raises(errors.ConfigError, match="tuples of 2 values, one per linked path"):
        graph.expand(c, 8)


def test_warmup_longer_than_the_stage_is_refused_unless_allowed():
    c = default.get_config("smoke")
    c.finetune.warmup_steps = 4  # the smoke fine-tuning stage has 4 steps
    with pytest.raises(
        errors.ConfigError,
        match=r"finetune.warmup_steps=4: a warmup shorter "
        r"than the stage's 4 steps",
    ):
        graph.expand(c, 8)
    c.finetune.allow_unreached_peak = True
    assert len(graph.expand(c, 8)) == 21
    c = default.get_config("smoke")
    c.posttrain.update(compute_matched=True, warmup_fraction=0.25)
    c.sweep.posttrain = (("posttrain.lr", (3e-3,)),)
    c.data.post_pool_tokens = 16_384
    c.sweep.pretrain = (("pretrain.exposure.lam", (0.0, 0.5)),)
    steps = {}
    for n in graph.expand(c, 8):
        if n.stage == "posttrain":
            p = data.plan("posttrain", n.exp)
            sched = n.exp.posttrain.optimizer.schedule(p.num_steps, p.batch * p.seq_len)
            steps[n.exp.pretrain.exposure.lam] = (p.num_steps, sched["warmup_steps"])
    assert steps == {0.0: (8, 2), 0.5: (4, 1)}  # the same shape at every λ


def test_schedule_resolution():
    opt = config.parse(base.get_config(), 8).posttrain.optimizer  # lr 1e-3, min 5e-5, warmup 20
    assert opt.schedule(100, 2048) == {
        "lr": 1e-3,
        "min_lr": 5e-5,
        "warmup_steps": 20,
        "total_steps": 100,
        "weight_decay": 0.1,
    }
    frac = dataclasses.replace(opt, warmup_fraction=0.3, horizon_tokens=2048 * 40 + 1)
    s = frac.schedule(100, 2048)
    assert (s["warmup_steps"], s["total_steps"]) == (30, 41)  # horizon rounds up to a step
    assert dataclasses.replace(opt, min_lr=5e-3).schedule(10, 1)["min_lr"] == 1e-3  # clamped
