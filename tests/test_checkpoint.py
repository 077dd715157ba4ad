"""Checksums of checkpointed arrays: the host computation's value under every mesh, and
every single changed bit seen (damaged restores: tests/test_faults.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import default
from retention_jax import checkpoint, config, sharding
from retention_jax import model as model_lib


def _fmix(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> 16)
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _host_digest(x: np.ndarray) -> str:
    """The digest computed on the host from the definition, for comparison."""
    x = x.astype(np.uint8) if x.dtype == bool else x
    u = x.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize]).astype(np.uint32)
    i = np.arange(x.size, dtype=np.uint32).reshape(x.shape)
    with np.errstate(over="ignore"):
        a = _fmix(u * np.uint32(0x9E3779B1) + i)
        b = _fmix(u ^ _fmix(i * np.uint32(0x27D4EB2F) + np.uint32(0x165667B1)))
        return f"{a.sum(dtype=np.uint32):08x}{b.sum(dtype=np.uint32):08x}"


def _params(mesh_sizes: dict):
    exp = config.parse(default.get_config("smoke"), 8, 1)
    mesh = sharding.make_mesh(mesh_sizes)
    return nnx.state(model_lib.create(exp.model, mesh, exp.rules, seed=0), nnx.Param)


MESHES = (
    dict(data=8, fsdp=1, tensor=1),
    dict(data=1, fsdp=8, tensor=1),
    dict(data=2, fsdp=2, tensor=2),
)


def test_checksums_are_the_host_digest_under_every_mesh():
    trees = [_params(m) for m in MESHES]
    specs = {str(x.sharding.spec) for t in trees for x in jax.tree.leaves(t)}
    assert len(specs) > 3  # the meshes do lay the arrays out differently
    sums = [checkpoint.checksums(t) for t in trees]
    assert sums[0] == sums[1] == sums[2]
    host = jax.tree_util.tree_flatten_with_path(jax.device_get(trees[0]))[0]
    assert sums[0] == {jax.tree_util.keystr(p): _host_digest(np.asarray(x)) for p, x in host}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.int32, jnp.uint8])
def test_every_single_bit_flip_changes_both_sums(dtype):
    x = (np.abs(np.random.default_rng(0).standard_normal((4, 8))) * 50).astype(dtype)
    base = checkpoint.checksums({"x": x})["['x']"]
    bits = x.reshape(-1).view(np.uint8)
    for byte in (0, 5, bits.size - 1):
        for bit in range(8):
            flipped = bits.copy()
            flipped[byte] ^= np.uint8(1 << bit)
            got = checkpoint.checksums({"x": flipped.view(x.dtype).reshape(x.shape)})["['x']"]
            assert got[:8] != base[:8] and got[8:] != base[8:], (byte, bit)
    j = int(np.argmax(x.reshape(-1) != x.flat[0]))  # an element unlike the first
    swapped = x.copy().reshape(-1)
    swapped[0], swapped[j] = x.flat[j], x.flat[0]
    swapped = swapped.reshape(x.shape)
    assert checkpoint.checksums({"x": swapped})["['x']"] != base
