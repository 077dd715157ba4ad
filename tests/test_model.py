"""The decoder: sizes, causality, packing, dropout, scan/unroll/remat, bf16, LoRA, sharding."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from configs import base
from retention_jax import config, cost, errors, presets
from retention_jax import model as model_lib
from tests import helpers

B, L = 2, 16


# Smaller than the tiny preset, in a Python layer loop: it compiles a little faster on
# CPU (scan is tested against it).
SMALL = dict(
    vocab_size=128,
    d_model=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=16,
    d_mlp=96,
    scan_layers=False,
)
raw = functools.partial(helpers.model_section, **SMALL)
small = functools.partial(helpers.model_config, **SMALL)


def rng(seed: int) -> jax.Array:
    """RBG keys: threefry random numbers take ~5-10x longer to compile on CPU."""
    return jax.random.key(seed, impl="rbg")


def build(cfg: config.Model, seed: int = 0) -> model_lib.Transformer:
    with nnx.use_eager_sharding(False):  # no mesh needed for numerics
        return model_lib.Transformer(cfg, rngs=nnx.Rngs(params=rng(seed)))


@nnx.jit
def forward(model, tokens_BxL, positions_BxL, segments_BxL, key=None):
    return model(tokens_BxL, positions_BxL, segments_BxL, dropout_key=key)


@nnx.jit
def grad_of_mean_square(model, tokens_BxL, positions_BxL, segments_BxL, key):
    def loss(m):
        return jnp.mean(m(tokens_BxL, positions_BxL, segments_BxL, dropout_key=key) ** 2)

    return nnx.grad(loss)(model)


def inputs(seed: int = 0) -> tuple[jax.Array, jax.Array, jax.Array]:
    tokens_BxL = jax.random.randint(rng(seed), (B, L), 1, 128)
    positions_BxL = jnp.broadcast_to(jnp.arange(L), (B, L))
    return tokens_BxL, positions_BxL, jnp.ones((B, L), jnp.int32)


def test_param_counts_without_allocating():
    parse = config.parse_model
    assert model_lib.count_params(parse(presets.smollm2_135m())) == 134_515_008
    n_1b = model_lib.count_params(parse(presets.paper_1b()))
    assert n_1b == 1_029_917_376  # the paper's ~1.03B: an untied LM head
    tied = presets.paper_1b()
    tied.tie_embeddings = True
    assert model_lib.count_params(parse(tied)) == 944_982_720
    lora = dataclasses.replace(
        parse(presets.smollm2_135m()), lora=config.Lora(64, 128.0, 0.0, ("o",))
    )
    assert model_lib.count_params(lora) == 134_515_008  # adapters are not counted


def test_flops_per_token():
    # N_matmul = all parameters minus norms (the tied embedding counts once, as the head).
    n_matmul = 134_515_008 - (30 * 2 * 576 + 576)
    expected = 6 * n_matmul + 6 * 30 * 1024 * 576
    assert (
        cost.flops_per_token(config.parse_model(presets.smollm2_135m()), 1024)
        == expected
        == 913_047_552
    )


def test_causal_by_gradient():
    model = build(small())
    tokens_BxL, positions_BxL, segments_BxL = inputs()
    x_BxLxD = model.embed[...][tokens_BxL]
    t = 7

    @jax.jit
    def grad_wrt_inputs(x):
        def logit_sum(x):
            return (model.trunk(x, positions_BxL, segments_BxL) @ model.head_weight())[:, t].sum()

        return jax.grad(logit_sum)(x)

    norms_L = np.abs(np.asarray(grad_wrt_inputs(x_BxLxD))).sum(axis=(0, 2))
    assert np.all(norms_L[t + 1 :] == 0.0)
    assert np.all(norms_L[: t + 1] > 0.0)


def test_segments_isolate_packed_documents():
    model = build(small())
    tokens_BxL, _, _ = inputs()
    half = L // 2
    segments_BxL = jnp.concatenate([jnp.ones((B, half), int), 2 * jnp.ones((B, half), int)], 1)
    positions_BxL = jnp.concatenate([jnp.arange(half), jnp.arange(half)])[None].repeat(B, 0)
    logits = np.asarray(forward(model, tokens_BxL, positions_BxL, segments_BxL))
    other = np.asarray(forward(model, tokens_BxL.at[:, half:].set(5), positions_BxL, segments_BxL))
    np.testing.assert_array_equal(logits[:, :half], other[:, :half])
    assert not np.allclose(logits[:, half:], other[:, half:])
    # The second document placed alone at the start of a row gives the same logits.
    shifted = (jnp.roll(tokens_BxL, half, 1), jnp.roll(positions_BxL, half, 1), segments_BxL)
    alone = np.asarray(forward(model, *shifted))
    np.testing.assert_allclose(logits[:, half:], alone[:, :half], atol=1e-5)


def test_dropout_is_explicit_and_per_key():
    rates = dict(embed=0.1, attn=0.1, resid=0.1, mlp=0.1)
    model = build(small(dropout=rates))
    args = inputs()
    plain = np.asarray(forward(model, *args))
    np.testing.assert_array_equal(plain, forward(model, *args))
    np.testing.assert_array_equal(plain, forward(build(small()), *args))  # as without dropout
    k1 = np.asarray(forward(model, *args, rng(1)))
    np.testing.assert_array_equal(k1, forward(model, *args, rng(1)))
    k2 = np.asarray(forward(model, *args, rng(2)))
    assert np.abs(k1 - plain).mean() > 1e-3
    assert np.abs(k1 - k2).mean() > 1e-3
    assert set(nnx.state(model).keys()) == {"embed", "layers", "final_norm"}  # no RNG state


@pytest.mark.parametrize("site", ["embed", "attn", "resid", "mlp"])
def test_each_dropout_site_acts(site):
    rates = dict(embed=0.0, attn=0.0, resid=0.0, mlp=0.0) | {site: 0.2}
    model = build(small(dropout=rates))
    args = inputs()
    diff = np.abs(forward(model, *args, rng(0)) - forward(model, *args))
    assert diff.mean() > 1e-4


@pytest.mark.parametrize("scan_layers, remat", [(True, "none"), (True, "full"), (False, "dots")])
def test_scan_and_remat_match_plain_loop(scan_layers, remat):
    """Same parameter tree, same per-layer dropout keys, same logits and gradients."""
    rates = dict(embed=0.05, attn=0.05, resid=0.05, mlp=0.05)
    loop = build(small(dropout=rates))
    scan = build(small(scan_layers=scan_layers, remat=remat, dropout=rates))
    flat_loop, flat_scan = nnx.to_flat_state(nnx.state(loop)), nnx.to_flat_state(nnx.state(scan))
    assert [p for p, _ in flat_loop] == [p for p, _ in flat_scan]
    for (_, a), (_, b) in zip(flat_loop, flat_scan, strict=True):
        np.testing.assert_array_equal(a[...], b[...])
    args, k = inputs(), rng(3)
    if remat == "none":  # remat changes only the backward pass
        np.testing.assert_allclose(forward(scan, *args), forward(loop, *args), atol=1e-5)
        np.testing.assert_allclose(forward(scan, *args, k), forward(loop, *args, k), atol=1e-5)
    g_loop, g_scan = grad_of_mean_square(loop, *args, k), grad_of_mean_square(scan, *args, k)
    for a, b in zip(jax.tree.leaves(g_loop), jax.tree.leaves(g_scan), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_bf16_compute_close_to_fp32():
    args = inputs()
    fp32 = np.asarray(forward(build(small()), *args))
    bf16_model = build(small(dtype="bfloat16"))
    bf16 = forward(bf16_model, *args)
    assert bf16.dtype == jnp.bfloat16
    assert bf16_model.layers.q[...].dtype == jnp.float32  # parameters stay fp32
    err = np.abs(np.asarray(bf16, np.float32) - fp32)
    assert err.max() < 0.05 * np.abs(fp32).max()


def test_lora_adapters():
    cfg = dataclasses.replace(small(), lora=config.Lora(4, 8.0, 0.1, ("o", "gate", "up", "down")))
    model = build(cfg)
    adapters = nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))
    names = {path[-1] for path, _ in adapters}
    assert names == {f"{t}_lora_{ab}" for t in ("o", "gate", "up", "down") for ab in "ab"}
    assert model.layers.o_lora_a[...].shape == (2, 4, 16, 4)
    assert model.layers.o_lora_b[...].shape == (2, 4, 64)
    base_model = build(small())
    nnx.update(base_model, nnx.state(model, model_lib.BASE_PARAMS))
    args = inputs()
    np.testing.assert_array_equal(forward(model, *args), forward(base_model, *args))  # B = 0

    grads = grad_of_mean_square(model, *args, None)
    assert float(jnp.abs(grads["layers"]["up_lora_b"][...]).sum()) > 0.0
    lora_grads = nnx.to_flat_state(nnx.state(grads, nnx.LoRAParam))
    assert {path[-1] for path, _ in lora_grads} == names  # the filter the train step uses
    model.layers.up_lora_b[...] = jnp.full_like(model.layers.up_lora_b[...], 0.1)
    lora_logits = np.asarray(forward(model, *args))
    assert np.abs(lora_logits - forward(base_model, *args)).max() > 1e-3
    assert np.abs(lora_logits - forward(model, *args, rng(0))).max() > 1e-3  # adapter dropout


def test_create_and_abstract_state_are_sharded():
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    rules = base.get_config().rules
    cfg = small(tie_embeddings=False)
    model = model_lib.create(cfg, mesh, rules, seed=0)
    _, abstract = model_lib.abstract_state(cfg, mesh, rules)
    expected = {
        "embed": P("tensor", "fsdp"),
        "head": P("fsdp", "tensor"),
        "final_norm": P("fsdp"),
        "layers/q": P(None, "fsdp", "tensor"),
        "layers/k": P(None, "fsdp", "tensor"),
        "layers/o": P(None, "tensor", None, "fsdp"),
        "layers/down": P(None, "tensor", "fsdp"),
    }
    flat = {"/".join(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}
    flat_abs = {"/".join(p): v.get_value() for p, v in nnx.to_flat_state(abstract)}
    assert flat.keys() == flat_abs.keys()
    for name, spec in expected.items():
        want = NamedSharding(mesh, spec)
        assert flat[name].sharding.is_equivalent_to(want, flat[name].ndim), name
        assert flat_abs[name].sharding.is_equivalent_to(want, flat[name].ndim), name
    for name, a in flat_abs.items():
        assert isinstance(a, jax.ShapeDtypeStruct) and isinstance(a.sharding.mesh, Mesh)
        assert a.shape == flat[name].shape
        assert a.sharding.is_equivalent_to(flat[name].sharding, a.ndim), name
    assert abs(float(jnp.std(flat["layers/q"])) - cfg.init_std) < 0.002
    np.testing.assert_array_equal(flat["layers/attn_norm"], 1.0)


def _packed(length: int):
    """Two rows: one document, and two packed documents followed by padding (id 0)."""
    third = length // 3
    seg = np.ones((B, length), np.int32)
    seg[1, third : 2 * third], seg[1, 2 * third :] = 2, 0
    pos = np.tile(np.arange(length), (B, 1))
    pos[1, third : 2 * third] -= third
    pos[1, 2 * third :] = 0
    tokens = jax.random.randint(rng(5), (B, length), 1, 128)
    return tokens, jnp.asarray(pos), jnp.asarray(seg)


@pytest.mark.parametrize("impl, length", [("einsum_vjp", L), ("xla", L), ("splash", 128)])
def test_attention_implementations_match_einsum(impl, length):
    """Logits and gradients with packed documents and padding equal the reference path."""
    args = _packed(length)
    ref = build(small(attention="einsum", n_layers=1))
    other = build(small(attention=impl, n_layers=1))
    np.testing.assert_allclose(forward(other, *args), forward(ref, *args), atol=2e-5)
    g_ref = grad_of_mean_square(ref, *args, None)
    g_other = grad_of_mean_square(other, *args, None)
    for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g_other), strict=True):
        np.testing.assert_allclose(b, a, atol=2e-6)


def test_attention_vjp_with_dropout_matches_einsum():
    """The hand-written backward applies the same dropout mask as autodiff of the
    reference: equal logits and gradients under one key."""
    args = _packed(L)
    drop = dict(embed=0.0, attn=0.25, resid=0.0, mlp=0.0)
    ref = build(small(attention="einsum", n_layers=1, dropout=drop))
    other = build(small(attention="einsum_vjp", n_layers=1, dropout=drop))
    key = rng(3)
    out = forward(other, *args, key)
    np.testing.assert_allclose(out, forward(ref, *args, key), atol=2e-5)
    assert not np.allclose(out, forward(other, *args, None), atol=1e-3)  # dropout acted
    g_ref = grad_of_mean_square(ref, *args, key)
    g_other = grad_of_mean_square(other, *args, key)
    for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g_other), strict=True):
        np.testing.assert_allclose(b, a, atol=2e-6)


def test_swiglu_backward_matches_autodiff():
    gate, up = jax.random.normal(rng(0), (2, 64, 24)) * 3.0
    dy = jax.random.normal(rng(1), (64, 24))
    ref = jax.vjp(lambda g, u: jax.nn.silu(g) * u, gate, up)
    out = jax.vjp(model_lib._swiglu, gate, up)
    np.testing.assert_allclose(out[0], ref[0], rtol=1e-6, atol=1e-6)
    for a, b in zip(ref[1](dy), out[1](dy), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


def test_auto_choices_on_cpu():
    cfg = small(scan_layers=True)
    assert model_lib.attention_impl(cfg, 256) == "einsum_vjp"
    assert model_lib.layer_unroll(cfg) == cfg.n_layers  # auto: unrolled on CPU
    cfg = dataclasses.replace(cfg, scan_unroll=1)
    assert model_lib.layer_unroll(cfg) == 1  # an honest rolled loop when asked
    cfg = dataclasses.replace(cfg, scan_layers=False)
    assert model_lib.layer_unroll(cfg) == cfg.n_layers


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("attention", "flash", "config key model.attention='flash': auto | einsum"),
        ("scan_unroll", -1, "config key model.scan_unroll=-1: an integer >= 0"),
        ("loss_chunk", 1.5, "config key model.loss_chunk=1.5: an integer >= 0"),
    ],
)
def test_bad_performance_knobs_are_named(key, value, message):
    cfg = mlc.ConfigDict(raw().to_dict() | {key: value}, type_safe=False)
    with pytest.raises(errors.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config.parse_model(cfg)


def test_attention_dropout_needs_einsum():
    cfg = raw(attention="xla", dropout=dict(embed=0.0, attn=0.1, resid=0.0, mlp=0.0))
    with pytest.raises(
        errors.ConfigError, match=r"config key model.attention='xla': auto \| einsum \| einsum_vjp"
    ):
        config.parse_model(cfg)
    cfg.attention = "auto"
    assert model_lib.attention_impl(config.parse_model(cfg), 256) == "einsum_vjp"
