"""LoRA post-training: only adapters train, the base stays bit-identical, merging keeps
the function, and the graph merges adapters before full fine-tuning."""

import dataclasses
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import base, default
from retention_jax import (
    callbacks,
    checkpoint,
    config,
    errors,
    experiment,
    sharding,
    stage,
    trainer,
)
from retention_jax import model as model_lib
from tests import helpers

LORA = config.Lora(4, 8.0, 0.0, ("o", "gate", "up", "down", "head"))


def _adapter_count(m: config.Model) -> int:
    """Adapter parameters from the shapes: r·(in + out) per target and layer."""
    d, f, hd = m.d_model, m.d_mlp, m.n_heads * m.head_dim
    per_layer = {"o": hd + d, "gate": d + f, "up": d + f, "down": f + d}
    layers = sum(m.n_layers * m.lora.rank * per_layer[t] for t in m.lora.targets if t != "head")
    return layers + m.lora.rank * (d + m.vocab_size)


def test_only_adapters_get_gradients_and_optimizer_state():
    c = base.get_config()
    m = dataclasses.replace(helpers.model_config(), lora=LORA)
    mesh = helpers.one_device_mesh()
    opt = config.parse_optimizer(c.pretrain, "posttrain")
    fns = trainer.step_functions(m, opt, mesh, c.rules)
    params = trainer.init_params(fns, 0)
    state = trainer.fresh_state(fns, params, opt.schedule(10, 1))
    assert sum(x.size for x in jax.tree.leaves(state.opt[1].mu)) == _adapter_count(m) == 31_232
    before = jax.device_get(nnx.to_pure_dict(state.params))
    rng = np.random.RandomState(0)
    toks = rng.randint(1, 300, (8, 65)).astype(np.int32)
    host = dict(
        inputs=toks[:, :-1],
        targets=toks[:, 1:],
        segment_ids=np.ones((8, 64), np.int32),
        positions=np.tile(np.arange(64, dtype=np.int32), (8, 1)),
    )
    t = trainer.Trainer(
        fns, trainer.compile_train(fns, fns.batch_shapes(8, 64))[0], state, jax.random.PRNGKey(0)
    )
    for _ in range(2):
        t.train(host)
    after = jax.device_get(nnx.to_pure_dict(t.state.params))
    for k in ("embed", "final_norm"):
        np.testing.assert_array_equal(before[k], after[k])
    for k in ("q", "k", "v", "o", "gate", "up", "down", "attn_norm", "mlp_norm"):
        np.testing.assert_array_equal(before["layers"][k], after["layers"][k])
    assert not np.array_equal(before["layers"]["o_lora_b"], after["layers"]["o_lora_b"])
    assert not np.array_equal(before["head_lora_b"], after["head_lora_b"])


@pytest.mark.parametrize("tied", [True, False])
def test_merge_keeps_the_function(tied):
    m = dataclasses.replace(helpers.model_config(tie_embeddings=tied), lora=LORA)
    with nnx.use_eager_sharding(False):
        model = model_lib.Transformer(m, rngs=nnx.Rngs(params=jax.random.key(0, impl="rbg")))
    state = nnx.to_pure_dict(nnx.state(model))
    noise = np.random.default_rng(1)
    for name in ("o_lora_b", "gate_lora_b", "down_lora_b", "up_lora_b"):
        state["layers"][name] = 0.1 * noise.normal(size=state["layers"][name].shape)
    state["head_lora_b"] = 0.1 * noise.normal(size=state["head_lora_b"].shape)
    state = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), state)
    noisy = nnx.state(model)
    nnx.replace_by_pure_dict(noisy, state)
    nnx.update(model, noisy)
    merged, merged_cfg = model_lib.merge_lora(state, m)
    assert merged_cfg.lora.rank == 0 and not merged_cfg.tie_embeddings
    assert not any("lora" in k for k in merged) and not any("lora" in k for k in merged["layers"])
    with nnx.use_eager_sharding(False):
        plain = model_lib.Transformer(
            merged_cfg, rngs=nnx.Rngs(params=jax.random.key(1, impl="rbg"))
        )
    target = nnx.state(plain)
    nnx.replace_by_pure_dict(target, merged)
    nnx.update(plain, target)
    toks = jax.random.randint(jax.random.key(2, impl="rbg"), (2, 16), 1, 512)
    pos = jnp.broadcast_to(jnp.arange(16), (2, 16))
    seg = jnp.ones((2, 16), jnp.int32)
    a = model(toks, pos, seg)
    b = plain(toks, pos, seg)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=2e-5)


def test_lora_validation_names_the_key():
    c = default.get_config("smoke")
    c.posttrain.lora.update(rank=4, targets=("q", "qkv"))
    with pytest.raises(errors.ConfigError, match=r"config key posttrain.lora.targets="):
        config.parse(c, 8)


@pytest.mark.slow
def test_lora_graph_merges_adapters_before_fine_tuning(smoke_workdir, tmp_path):
    """Stage 2 with adapters from a finished pretraining node: its base weights stay the
    parent's, and stage 3 starts from W + alpha/rank · A @ B (tied head untied)."""
    c = helpers.smoke_one_pretrain()
    c.sweep.posttrain = (("posttrain.lr", (3e-3,)),)  # the added arm alone
    c.sweep.finetune = (("finetune.lr", (1e-4,)),)
    pre = next(n for n in experiment.expand(c) if n.stage == "pretrain")
    shutil.copytree(os.path.join(smoke_workdir, "runs", pre.id), tmp_path / "runs" / pre.id)
    c.posttrain.lora.rank = 4
    starts = []
    look = callbacks.OnStart(
        lambda t: starts.append(jax.device_get(nnx.to_pure_dict(t.state.params)))
    )
    rows = experiment.run(c, str(tmp_path), extra_callbacks=[look])
    assert len(rows) == 1 and rows[0]["method"] == "unmixed+lora" and rows[0]["lora_rank"] == 4
    post, ft = (n for n in experiment.expand(c) if n.stage != "pretrain")
    mesh = sharding.make_mesh(post.exp.mesh)
    _, shapes = model_lib.abstract_state(post.exp.model_for("posttrain"), mesh, post.exp.rules)
    run = os.path.join(tmp_path, "runs", post.id)
    result = stage.read_result(run)
    trained = jax.device_get(
        nnx.to_pure_dict(
            checkpoint.restore_params(os.path.join(run, "ckpt"), result["result_step"], shapes)
        )
    )
    parent = starts[0]  # the stage-2 start: the parent's parameters and fresh adapters
    np.testing.assert_array_equal(trained["layers"]["q"], parent["layers"]["q"])
    np.testing.assert_array_equal(trained["embed"], parent["embed"])
    merged, _ = model_lib.merge_lora(trained, post.exp.model_for("posttrain"))
    ft_start = starts[1]
    assert "head" in ft_start and not any("lora" in k for k in ft_start["layers"])
    for k in ("o", "down", "q"):
        np.testing.assert_allclose(ft_start["layers"][k], merged["layers"][k], rtol=0, atol=1e-6)
    np.testing.assert_allclose(ft_start["head"], merged["head"], rtol=0, atol=1e-6)
