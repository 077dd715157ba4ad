"""Config validation: every bad value is named with its key and what is allowed."""

import re

import pytest

from configs import base, corpora, default, lambda_sweep, paper_1b, paper_135m
from retention_jax import config, experiment

# (config module, argument, devices it is validated for, nodes in its graph)
SHIPPED = [
    (default, "", 8, 2 + 4 + 16),
    (default, "smoke", 8, 2 + 2 + 4),
    *[(paper_135m, p, 32, 2 + 90 + 360) for p in corpora.PIPELINES],
    *[(paper_135m, p + ",smoke", 8, 2 + 4 + 8) for p in corpora.PIPELINES],
    *[(paper_1b, p, 256, 2 + 10 + 30) for p in corpora.PIPELINES],
    *[(paper_1b, p + ",smoke", 8, 2 + 2 + 4) for p in corpora.PIPELINES],
    (lambda_sweep, "added", 32, 15 * 3),
    (lambda_sweep, "compute_matched,smoke", 8, 10 * 3),
]


@pytest.mark.parametrize("module, arg, devices, nodes", SHIPPED)
def test_shipped_configs_validate_and_expand(module, arg, devices, nodes):
    c = module.get_config(arg) if arg else module.get_config()
    config.validate(c, devices)
    graph = experiment.expand(c)
    assert len(graph) == nodes
    for n in graph:
        config.validate(n.cfg, devices)
    if arg.endswith("smoke") or module is default:  # runs here: built-in data only
        for d in ("pre", "post", "ft"):
            assert c.data[d].source.startswith("builtin:")


@pytest.mark.parametrize(
    "path, value, message",
    [
        (
            "model.n_kv_heads",
            3,
            "model.n_kv_heads=3 is invalid; allowed: a divisor of model.n_heads=4",
        ),
        ("model.dtype", "float16", "model.dtype='float16' is invalid; allowed: float32 | bfloat16"),
        ("model.remat", "some", "allowed: none | full | dots"),
        ("model.dropout.attn", 1.0, "model.dropout.attn=1.0"),
        ("model.lora.targets", ("q", "qkv"), "model.lora.targets"),
        ("model.lora.rank", 8, "model.lora.rank=8 is invalid; allowed: 0 (LoRA stages"),
        ("pretrain.decay_exclude", ("norm", 3), "pretrain.decay_exclude=('norm', 3)"),
        (
            "pretrain.batch",
            6,
            "pretrain.batch=6 is invalid; allowed: a multiple of mesh data×fsdp=8",
        ),
        ("posttrain.lr", -1.0, "posttrain.lr=-1.0"),
        ("finetune.min_lr", 1.0, "finetune.min_lr=1.0 is invalid; allowed: a number in [0, 0.001]"),
        (
            "posttrain.warmup_steps",
            -5,
            "posttrain.warmup_steps=-5 is invalid; allowed: an integer >= 0",
        ),
        ("posttrain.dropout", 1.2, "posttrain.dropout=1.2"),
        ("posttrain.early_stop.patience", -1, "posttrain.early_stop.patience=-1"),
        ("eval.batch", 12, "eval.batch=12"),
        ("seed", -3, "seed=-3 is invalid"),
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
    with pytest.raises(ValueError, match=re.escape(message)):
        config.validate(c)


def test_bad_sweeps_are_named():
    c = base.get_config()
    c.sweep.posttrain = (("posttrain.learning_rate", (1e-3,)),)
    with pytest.raises(ValueError, match="sweep.posttrain='posttrain.learning_rate'"):
        config.validate(c)
    c = base.get_config()
    c.sweep.finetune = (("finetune.lr", ()),)
    with pytest.raises(ValueError, match="sweep.finetune.finetune.lr"):
        config.validate(c)
    c = base.get_config()
    c.sweep.finetune = (("finetune.lr",),)
    with pytest.raises(ValueError, match="sweep.finetune"):
        config.validate(c)
    c = base.get_config()
    c.sweep.finetune = (("pretrain.exposure.lam", (0.0, 1.0)),)
    with pytest.raises(ValueError, match=r"sweep.finetune='pretrain.exposure.lam'.*finetune\."):
        config.validate(c)


def test_seed_is_swept_with_pretraining_only():
    c = base.get_config()
    c.sweep.posttrain = (("seed", (0, 1)),)  # would split one pool differently per branch
    with pytest.raises(ValueError, match=r"sweep.posttrain='seed'"):
        config.validate(c)


def test_bad_rules_are_named():
    c = base.get_config()
    c.rules = (("embed", "fsdp"), ("mlp", "model"))
    with pytest.raises(ValueError, match=r"rules=\('mlp', 'model'\)"):
        config.validate(c)
