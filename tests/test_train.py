"""The shared train step: golden losses, mesh invariance, shardings, schedule, AOT 1B."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import base, paper_1b, paper_135m
from retention_jax import config, data, errors, presets, runtime, sharding, trainer
from retention_jax import model as model_lib
from retention_jax import steps as steps_lib
from tests import helpers

# Tiny config, seed 0, the batch below, pretrain optimizer with 100 total steps.
GOLDEN_LOSSES = [6.269769, 6.233201, 6.16709]

# Parameter shardings of the tiny model on mesh (data 2, fsdp 2, tensor 2).
SHARDING_TABLE = {
    "embed": "P('tensor', 'fsdp')",
    "final_norm": "P('fsdp',)",
    "layers/attn_norm": "P(None, 'fsdp')",
    "layers/mlp_norm": "P(None, 'fsdp')",
    "layers/q": "P(None, 'fsdp', 'tensor', None)",
    "layers/k": "P(None, 'fsdp', 'tensor', None)",
    "layers/v": "P(None, 'fsdp', 'tensor', None)",
    "layers/o": "P(None, 'tensor', None, 'fsdp')",
    "layers/gate": "P(None, 'fsdp', 'tensor')",
    "layers/up": "P(None, 'fsdp', 'tensor')",
    "layers/down": "P(None, 'tensor', 'fsdp')",
}


def _batch(batch=8, length=64, seed=0):
    toks = np.random.RandomState(seed).randint(1, 300, (batch, length + 1)).astype(np.int32)
    segment_ids = np.ones((batch, length), np.int32)
    segment_ids[-1, length // 2 :] = 0  # one padded tail: no loss there
    return dict(
        inputs=toks[:, :-1],
        targets=toks[:, 1:],
        segment_ids=segment_ids,
        positions=np.tile(np.arange(length, dtype=np.int32), (batch, 1)),
    )


def _start(model, opt, mesh, rules, total_steps=100):
    """Step functions and a fresh state from seed 0 for config sections `model`, `opt`."""
    m, o = config.parse_model(model), config.parse_optimizer(opt, "pretrain")
    steps = trainer.step_functions(m, o, mesh, rules)
    params = trainer.init_params(steps, 0)
    return steps, trainer.fresh_state(steps, params, o.schedule(total_steps, 1))


def test_init_params_compile_once_and_equal_the_eager_seeded_model():
    """The jitted init with its seed as an argument (and XLA:CPU level 1) draws the same
    parameters, in the same shardings, as a model built with the seed as a constant."""
    c = base.get_config()
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
    m, o = config.parse_model(c.model), config.parse_optimizer(c.pretrain, "pretrain")
    steps = trainer.step_functions(m, o, mesh, c.rules)
    for seed in (3, 2**40):  # a config's seed may exceed int32: keyed outside the program
        ours = trainer.init_params(steps, seed)
        ref = nnx.state(model_lib.create(m, mesh, c.rules, seed))
        for (path, a), (_, b) in zip(nnx.to_flat_state(ours), nnx.to_flat_state(ref)):
            assert a.sharding.is_equivalent_to(b.sharding, a.ndim), path
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))
    assert steps.init_params._cache_size() == 1
    first = lambda seed: np.asarray(trainer.init_params(steps, seed)["embed"][...])
    assert not np.array_equal(first(3), first(4))


def _compile(steps, shape):
    return trainer.compile_train(steps, dict.fromkeys(data.KEYS, shape))


def _run(mesh_sizes, n_steps=3, opt_overrides=None):
    c = base.get_config()
    opt = c.pretrain
    if opt_overrides:
        opt.update(opt_overrides)
    n = int(np.prod(list(mesh_sizes.values())))
    mesh = sharding.make_mesh(mesh_sizes, jax.devices()[:n])
    steps, state = _start(c.model, opt, mesh, c.rules)
    batch = {k: jax.device_put(v, steps.batch_sharding) for k, v in _batch().items()}
    shapes = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding) for k, v in batch.items()
    }
    exe, _ = trainer.compile_train(steps, shapes)
    out = []
    for _ in range(n_steps):
        state, m = exe(state, batch, jax.random.PRNGKey(0))
        out.append(jax.device_get(m))
    return out, state, steps


def test_golden_losses_one_device():
    metrics, state, _ = _run(dict(data=1, fsdp=1, tensor=1))
    losses = [float(m["loss"]) for m in metrics]
    assert int(state.step) == 3
    assert metrics[0]["tokens"] == 8 * 64 - 32
    np.testing.assert_allclose(losses, GOLDEN_LOSSES, rtol=0, atol=2e-5)


def test_eight_devices_match_one():
    one, _, _ = _run(dict(data=1, fsdp=1, tensor=1))
    eight, state, steps = _run(dict(data=2, fsdp=2, tensor=2))
    for a, b in zip(one, eight):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=0, atol=1e-5)
        np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-5)
    table = {
        "/".join(str(getattr(k, "key", k)) for k in path[:-1]): str(x.sharding.spec)
        for path, x in jax.tree_util.tree_flatten_with_path(state.params)[0]
    }
    assert table == SHARDING_TABLE
    # Adam moments are sharded like their parameters.
    mu = state.opt[1].mu
    assert jax.tree.map(lambda x: x.sharding.spec, mu) == jax.tree.map(
        lambda x: x.sharding.spec, state.params
    )


def test_schedule_warmup_then_cosine():
    hp = steps_lib.hparams(
        config.parse_optimizer(base.get_config().pretrain, "pretrain").schedule(110, 1)
    )
    hp.update(lr=jnp.float32(1.0), min_lr=jnp.float32(0.1), warmup_steps=jnp.float32(10))
    lrs = [float(steps_lib.learning_rate(jnp.int32(s), hp)) for s in (0, 4, 9, 10, 60, 110, 200)]
    np.testing.assert_allclose(lrs, [0.1, 0.5, 1.0, 1.0, 0.55, 0.1, 0.1], atol=1e-6)


def test_weight_decay_skips_norms():
    c = base.get_config()
    mesh = helpers.one_device_mesh()
    params = nnx.state(model_lib.create(helpers.model_config(), mesh, c.rules, 0))
    decayed = {
        "/".join(str(getattr(k, "key", k)) for k in path[:-1]): steps_lib.decays(path, ("norm",))
        for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    assert not decayed["final_norm"] and not decayed["layers/attn_norm"]
    assert decayed["embed"] and decayed["layers/q"] and decayed["layers/down"]


def test_stages_share_one_compiled_step():
    """Different LR, warmup and decay (traced hyperparameters) reuse the executable."""
    c = base.get_config()
    rt = runtime.Runtime(helpers.one_device_mesh(), c.rules)
    model = helpers.model_config()
    a = config.parse_optimizer(c.pretrain, "pretrain")
    c.pretrain.update(lr=5e-4, warmup_steps=3, weight_decay=0.0)
    b = config.parse_optimizer(c.pretrain, "pretrain")
    exes = [rt.train_executable(rt.step_functions(model, o), 8, 64)[0] for o in (a, b)]
    assert exes[0] is exes[1] and rt.compiles["train"] == 1
    c.pretrain.clip_norm = 0.5  # shapes the program: a second executable
    rt.train_executable(rt.step_functions(model, config.parse_optimizer(c.pretrain, "p")), 8, 64)
    assert rt.compiles["train"] == 2


def test_cpu_step_compiles_without_ynn_dot_fusions():
    """`trainer.CPU_COMPILER_OPTIONS` reach the compiler: the step's matmuls are plain
    dots in the entry computation, not kernels fused with their elementwise neighbours."""
    c = base.get_config()
    mesh = helpers.one_device_mesh()
    steps, _ = _start(c.model, c.pretrain, mesh, c.rules)
    text = _compile(steps, jax.ShapeDtypeStruct((8, 64), jnp.int32))[0].as_text()
    entry = text[text.index("ENTRY") :]
    assert entry.count(" dot(") >= 7 * c.model.n_layers  # 7 projections a layer, forward alone


@pytest.mark.slow
def test_1b_compiles_ahead_of_time_on_eight_devices():
    c = base.get_config()
    m = presets.paper_1b()
    m.remat = "full"
    m = config.parse_model(m)
    mesh = sharding.make_mesh(dict(data=2, fsdp=4, tensor=1))
    steps = trainer.step_functions(m, config.parse_optimizer(c.pretrain, "pretrain"), mesh, c.rules)
    shape = jax.ShapeDtypeStruct((8, 1024), jnp.int32, sharding=steps.batch_sharding)
    exe, seconds = _compile(steps, shape)
    mem = exe.memory_analysis()
    n = model_lib.count_params(m)
    # Parameters and both Adam moments, fp32, split over fsdp=4, are the per-device arguments.
    assert mem.argument_size_in_bytes == pytest.approx(3 * 4 * n / 4, rel=0.02)
    gib = 2**30
    print(
        f"1B AOT compile {seconds:.1f}s; per-device args {mem.argument_size_in_bytes / gib:.2f}"
        f" GiB, temp {mem.temp_size_in_bytes / gib:.2f} GiB"
    )


def _one_step(mesh_sizes, microbatches, batch=8, length=64, model_overrides=None):
    """(metrics, params) after one step from seed 0, compiled with `microbatches`."""
    c = base.get_config()
    c.pretrain.microbatches = microbatches
    c.model.update(model_overrides or {})
    n = int(np.prod(list(mesh_sizes.values())))
    mesh = sharding.make_mesh(mesh_sizes, jax.devices()[:n])
    steps, state = _start(c.model, c.pretrain, mesh, c.rules)
    host = _batch(batch, length)
    host["segment_ids"][0, 5:] = 0  # uneven real-token counts across microbatches
    batch = {k: jax.device_put(v, steps.batch_sharding) for k, v in host.items()}
    exe, _ = trainer.compile_train(  # under the mesh: activations pinned to rows
        steps,
        {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding) for k, v in batch.items()},
    )
    state, m = exe(state, batch, jax.random.PRNGKey(0))
    return jax.device_get(m), jax.device_get(state.params), exe


@pytest.mark.parametrize(
    "mesh_sizes, microbatches",
    [(dict(data=1, fsdp=1, tensor=1), 4), (dict(data=2, fsdp=2, tensor=1), 2)],
)
def test_accumulated_step_equals_full_batch(mesh_sizes, microbatches):
    """Token-weighted accumulation is the full batch's mean-loss gradient: one update."""
    full, p_full, _ = _one_step(mesh_sizes, 1)
    acc, p_acc, _ = _one_step(mesh_sizes, microbatches)
    assert acc["tokens"] == full["tokens"] == 8 * 64 - 32 - 59
    np.testing.assert_allclose(acc["loss"], full["loss"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(acc["grad_norm"], full["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(p_acc), jax.tree.leaves(p_full), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_accumulation_shrinks_compiled_memory():
    temp = {}
    for n in (1, 4):
        exe = _one_step(dict(data=1, fsdp=1, tensor=1), n, batch=16, length=256)[2]
        temp[n] = exe.memory_analysis().temp_size_in_bytes
    assert temp[4] < 0.5 * temp[1], temp


def test_chunked_loss_step_matches_golden():
    metrics, _, _ = _one_step(
        dict(data=1, fsdp=1, tensor=1), 1, model_overrides=dict(loss_chunk=16)
    )
    reference, _, _ = _one_step(dict(data=1, fsdp=1, tensor=1), 1)
    np.testing.assert_allclose(metrics["loss"], reference["loss"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(metrics["grad_norm"], reference["grad_norm"], rtol=1e-5)


def test_microbatches_must_divide_rows():
    c = base.get_config()
    c.pretrain.batch, c.pretrain.microbatches = 16, 3
    with pytest.raises(errors.ConfigError, match=r"pretrain.microbatches=3: a divisor"):
        config.parse(c, 8)
    c.pretrain.microbatches = 2
    config.parse(c, 8)


@pytest.mark.parametrize(
    "devices, cap, microbatches", [(8, 4, 2), (1, 4, 12), (8, 6, 1), (8, 5, 2)]
)
def test_microbatch_rows_pick_the_fewest_microbatches_that_fit(devices, cap, microbatches):
    """Batch 48: 6 rows a device on 8 devices, 48 on one; a microbatch's rows divide them."""
    c = base.get_config()
    c.pretrain.batch, c.pretrain.microbatch_rows = 48, cap
    assert config.parse(c, devices).pretrain.optimizer.microbatches == microbatches
    assert config.parse_optimizer(c.pretrain, "pretrain", devices).microbatches == microbatches


def test_microbatch_rows_and_microbatches_exclude_each_other():
    c = base.get_config()
    c.posttrain.microbatches, c.posttrain.microbatch_rows = 2, 4
    with pytest.raises(
        errors.ConfigError, match=r"posttrain.microbatch_rows=4: 0 when microbatches=2 is set"
    ):
        config.parse(c, 8)


def test_fsdp_activations_stay_row_sharded():
    """On fsdp=8 each device holds 1/8 of the rows' activations, as with data=8."""
    c = base.get_config()
    temp = {}
    for axis in ("data", "fsdp"):
        mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1) | {axis: 8})
        steps, _ = _start(c.model, c.pretrain, mesh, c.rules)
        shape = jax.ShapeDtypeStruct((64, 256), jnp.int32, sharding=steps.batch_sharding)
        exe, _ = _compile(steps, shape)
        temp[axis] = exe.memory_analysis().temp_size_in_bytes
    assert temp["fsdp"] < 1.2 * temp["data"], temp


GPU_48GB, GPU_141GB = 44.7, 131.3  # GiB


@pytest.mark.parametrize(
    "name, devices, fsdp, stage, batch, microbatch_rows, microbatches, budget_gib",
    [
        ("paper_1b", 8, 8, "pretrain", 512, None, 8, GPU_48GB),
        ("paper_1b", 1, 1, "pretrain", 512, 32, 16, GPU_141GB),
        ("paper_135m", 8, 1, "posttrain", 896, None, 4, GPU_48GB),  # the largest swept batch
    ],
)
def test_paper_memory_fits(
    name, devices, fsdp, stage, batch, microbatch_rows, microbatches, budget_gib
):
    """The paper configs (bf16, remat dots, loss chunks, 1,024 tokens a row) as they stand
    on 8 devices (their microbatch_rows set the microbatches) fit under 48 GB a device,
    and 1B on one device with its docstring's microbatch_rows=32 under 141 GB; their
    evaluation batches too. AOT, nothing allocated."""
    c = {"paper_1b": paper_1b, "paper_135m": paper_135m}[name].get_config()
    c.model.scan_unroll = 1  # rolled, as on a GPU
    c[stage].batch = batch
    if microbatch_rows:
        c[stage].microbatch_rows = microbatch_rows
    m = config.parse_model(c.model)
    mesh = sharding.make_mesh(
        dict(data=devices // fsdp, fsdp=fsdp, tensor=1), jax.devices()[:devices]
    )
    opt = config.parse_optimizer(c[stage], stage, devices)
    assert opt.microbatches == microbatches
    steps = trainer.step_functions(m, opt, mesh, c.rules)
    shape = jax.ShapeDtypeStruct((batch, 1024), jnp.int32, sharding=steps.batch_sharding)
    exe, _ = _compile(steps, shape)
    mem = exe.memory_analysis()
    n = model_lib.count_params(m)
    assert mem.argument_size_in_bytes == pytest.approx(3 * 4 * n / fsdp, rel=0.02)
    train_gib = (mem.argument_size_in_bytes + mem.temp_size_in_bytes) / 2**30
    with jax.set_mesh(mesh):
        ev_shape = jax.ShapeDtypeStruct((c.eval.batch, 1024), jnp.int32, sharding=shape.sharding)
        ev_batch = dict.fromkeys(data.KEYS, ev_shape)
        ev = steps.evaluate.lower(steps.state_shapes.params, ev_batch).compile().memory_analysis()
    eval_gib = (ev.argument_size_in_bytes + ev.temp_size_in_bytes) / 2**30
    print(f"{name} {stage} fsdp {fsdp}: train {train_gib:.2f} GiB, eval {eval_gib:.2f} GiB")
    # measured, arguments + temporaries: 1B on fsdp 8 21.5 GiB (eval 4.5), on one device
    # 97.9 (34.3); 135M, batch 896 on data 8: 27.1 (eval 1.1)
    assert train_gib < 0.8 * budget_gib and eval_gib < 0.8 * budget_gib, (train_gib, eval_gib)
