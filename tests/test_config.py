"""Config validation: every bad value is named with its key and what is allowed."""

import re

import pytest

from configs import base, default
from retention_jax import config


def test_shipped_configs_validate():
    config.validate(base.get_config())
    config.validate(default.get_config())
    config.validate(default.get_config("smoke"))


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
