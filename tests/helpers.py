"""Builders the tests share: small model configs, the smoke experiment with one
pretraining node, and a one-device mesh (`from tests import helpers`)."""

import jax
import ml_collections as mlc

from configs import default
from retention_jax import config, presets, sharding


def model_section(**overrides) -> mlc.ConfigDict:
    """The tiny preset's `model` section (the one `configs/base.py` runs) with `overrides`:
    for tests of the config checks, which want it untyped."""
    section = presets.tiny()
    section.update(overrides)
    return section


def model_config(**overrides) -> config.Model:
    """`model_section(**overrides)`, typed and checked as a run's `model` is."""
    return config.parse_model(model_section(**overrides))


def smoke_one_pretrain() -> mlc.ConfigDict:
    """`configs/default.py:smoke` with its pretraining λ sweep cut to λ = 0: one
    pretraining node, whose run directory the session's smoke experiment holds."""
    c = default.get_config("smoke")
    c.sweep.pretrain = (("pretrain.exposure.lam", (0.0,)),)
    return c


def one_device_mesh() -> jax.sharding.Mesh:
    """The (data, fsdp, tensor) = (1, 1, 1) mesh on the first device."""
    return sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
