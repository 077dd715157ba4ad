"""A finished node out to Hugging Face and back in: transformers' logits, bit-equal params."""

import dataclasses
import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import default
from retention_jax import (
    callbacks,
    checkpoint,
    config,
    data,
    errors,
    evaluate,
    experiment,
    export,
    hf,
    runtime,
    sharding,
    stage,
)
from retention_jax import model as model_lib
from retention_jax.analysis import results
from retention_jax.data.tokenizer import ByteTokenizer
from tests import helpers

torch = pytest.importorskip("torch", reason="torch runs the exported model in transformers")
transformers = pytest.importorskip("transformers", reason="transformers loads the export")

pytestmark = pytest.mark.slow  # the session's smoke experiment


@pytest.fixture(scope="module")
def node(smoke_workdir) -> str:
    """A post-training node (its result step is chosen by early stopping)."""
    return results.load(smoke_workdir)[0]["ids"]["posttrain"]


@pytest.fixture(scope="module")
def exported(smoke_workdir, node, tmp_path_factory) -> str:
    """The node exported through the command line, by an id prefix."""
    out = str(tmp_path_factory.mktemp("hf"))
    cmd = [sys.executable, "-m", "retention_jax.export"]
    cmd += [f"--workdir={smoke_workdir}", f"--node={node[:14]}", f"--out={out}"]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    return out


def test_export_files(exported):
    assert sorted(os.listdir(exported)) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]


def test_transformers_logits_match(smoke_workdir, node, exported, caplog):
    with caplog.at_level(logging.INFO, logger="absl"):
        model_cfg, _, params = export.result_params(export.find_node(smoke_workdir, node))
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    graphdef, _ = model_lib.abstract_state(
        model_cfg, helpers.one_device_mesh(), _replicated(model_cfg)
    )
    ours = nnx.merge(graphdef, params)
    tokens_BxL = np.random.default_rng(0).integers(0, 258, (2, 24))
    B, L = tokens_BxL.shape
    logits = ours(
        jnp.asarray(tokens_BxL),
        jnp.broadcast_to(jnp.arange(L), (B, L)),
        jnp.ones((B, L), jnp.int32),
    )
    theirs = transformers.LlamaForCausalLM.from_pretrained(exported, local_files_only=True)
    with torch.no_grad():
        expected = theirs.eval()(torch.from_numpy(tokens_BxL)).logits.numpy()
    assert np.abs(expected).max() > 1.0  # a trained model, not zeros
    np.testing.assert_allclose(np.asarray(logits), expected, atol=2e-4)


def test_exported_tokenizer_gives_training_ids(exported):
    tok = transformers.AutoTokenizer.from_pretrained(exported, local_files_only=True)
    text = "Motif in D minor: ♩ = 96\n\tbenzene C6H6"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == ByteTokenizer().encode(text)
    assert (tok.pad_token_id, tok.eos_token_id) == (0, 1)
    assert tok.decode(ids) == text


def test_stage_starts_from_export(smoke_workdir, node, exported):
    """hf.init_params on the experiment's mesh: the checkpoint's parameters bit for bit,
    and the node's recorded validation losses from them."""
    cfg = default.get_config("smoke")
    exp = config.parse(cfg, jax.device_count())
    mesh = sharding.make_mesh(exp.mesh)
    model_cfg = exp.model_for("posttrain")
    params = hf.init_params(exported, model_cfg, mesh, exp.rules)
    run_dir = export.find_node(smoke_workdir, node)
    result = stage.read_result(run_dir)
    _, target = model_lib.abstract_state(model_cfg, mesh, exp.rules)
    saved = checkpoint.restore_params(os.path.join(run_dir, "ckpt"), result["result_step"], target)
    jax.tree.map(np.testing.assert_array_equal, saved, params)
    assert jax.tree.map(lambda a: a.sharding, params) == jax.tree.map(lambda a: a.sharding, saved)
    rt = runtime.Runtime(mesh, exp.rules)
    fns = rt.step_functions(model_cfg, exp.posttrain.optimizer)
    plans = [data.plan(s, exp) for s in config.STAGES]
    corpus = data.prepare(exp.data, smoke_workdir, data.needs_of(plans))
    val = evaluate.losses(rt, fns, params, corpus, data.DOMAINS, exp.eval_batch)
    assert val == pytest.approx(result["val"], rel=1e-6)


@pytest.mark.parametrize(
    "field, value",
    [
        ("vocab_size", 1024),
        ("d_model", 64),
        ("n_layers", 2),
        ("n_heads", 8),
        ("n_kv_heads", 4),
        ("head_dim", 16),
        ("d_mlp", 256),
        ("tie_embeddings", False),
        ("rope_base", 500_000.0),
    ],
)
def test_init_params_names_the_mismatch(exported, field, value):
    cfg = default.get_config("smoke")
    cfg.model[field] = value
    model = config.parse_model(cfg.model)
    with pytest.raises(ValueError, match=rf"config key model\.{field}={value!r}: the checkpoint"):
        hf.init_params(exported, model, helpers.one_device_mesh(), cfg.rules)


def test_init_params_adds_fresh_lora(exported):
    cfg = default.get_config("smoke")
    model = dataclasses.replace(
        config.parse_model(cfg.model), lora=config.Lora(2, 128.0, 0.0, ("q", "down"))
    )
    params = hf.init_params(exported, model, helpers.one_device_mesh(), cfg.rules, seed=3)
    base = hf.load_params(exported, model)
    pure = nnx.to_pure_dict(params)
    np.testing.assert_array_equal(pure["layers"]["q"], base["layers"]["q"])
    assert not np.asarray(pure["layers"]["down_lora_b"]).any()  # B = 0: the base model's output
    assert np.asarray(pure["layers"]["q_lora_a"]).std() > 0


def _replicated(model_cfg) -> tuple:
    return tuple((axis, None) for axis in model_lib.axis_sizes(model_cfg))


def test_find_node_wants_exactly_one(smoke_workdir, node):
    assert export.find_node(smoke_workdir, node[:12]).endswith(os.path.join("runs", node))
    with pytest.raises(errors.UserError, match=r"--node='finetune': matches several nodes"):
        export.find_node(smoke_workdir, "finetune")
    with pytest.raises(errors.UserError, match=r"--node='nothing': matches no node"):
        export.find_node(smoke_workdir, "nothing")
    missing = os.path.join(smoke_workdir, "absent")
    with pytest.raises(errors.UserError, match=rf"--workdir={missing}: no run directories"):
        export.find_node(missing, "finetune")


def test_init_params_offline_hub_id(tmp_path):
    cfg = default.get_config("smoke")
    with pytest.raises(OSError, match="neither a local directory nor downloadable"):
        model = config.parse_model(cfg.model)
        hf.init_params("no-such-org/no-such-model", model, helpers.one_device_mesh(), cfg.rules)


def test_pretraining_starts_from_hf_weights(smoke_workdir, exported, tmp_path):
    """`pretrain.init='hf:DIR'` replaces the fresh initialisation: the stage's first
    parameters are the checkpoint's, bit for bit; a bad value is named."""
    cfg = helpers.smoke_one_pretrain()
    cfg.pretrain.init = f"hf:{exported}"
    seen = []

    def look(t):
        seen.append(jax.device_get(t.state.params))
        raise _Stop()

    with pytest.raises(_Stop):
        experiment.run(
            cfg, str(tmp_path), only="pretrain", extra_callbacks=[callbacks.OnStart(look)]
        )
    model = config.parse_model(cfg.model)
    want = hf.load_params(exported, model)
    np.testing.assert_array_equal(nnx.to_pure_dict(seen[0])["layers"]["q"], want["layers"]["q"])
    np.testing.assert_array_equal(nnx.to_pure_dict(seen[0])["embed"], want["embed"])
    cfg.pretrain.init = "pretrained"
    with pytest.raises(errors.ConfigError, match="config key pretrain.init='pretrained'"):
        experiment.expand(cfg)


class _Stop(BaseException):
    pass
