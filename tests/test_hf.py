"""HF Llama import/export: logits parity with transformers, exact round trips, tokenizers."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import base
from retention_jax import config, data, hf
from retention_jax import model as model_lib
from tests import helpers

torch = pytest.importorskip("torch", reason="torch is needed to build reference HF models")
transformers = pytest.importorskip("transformers", reason="transformers builds the reference")

B, L, V = 2, 12, 96


def hf_model(n_kv_heads: int, tie: bool) -> "transformers.LlamaForCausalLM":
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=n_kv_heads,
        rope_theta=500.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1 so that a wrong norm mapping shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return model


def hf_logits(model, tokens_BxL: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(tokens_BxL)).logits.numpy()


@nnx.jit
def _forward(model: model_lib.Transformer, tokens_BxL: jax.Array) -> jax.Array:
    positions_BxL = jnp.broadcast_to(jnp.arange(L), (B, L))
    return model(tokens_BxL, positions_BxL, jnp.ones((B, L), jnp.int32))


def load(path: str) -> model_lib.Transformer:
    """The checkpoint at `path` as a model, through `hf.init_params` (a stage's start)."""
    cfg, rules, mesh = hf.config_from_hf(path), base.get_config().rules, helpers.one_device_mesh()
    graphdef, _ = model_lib.abstract_state(cfg, mesh, rules)
    return nnx.merge(graphdef, hf.init_params(path, cfg, mesh, rules))


def our_logits(model: model_lib.Transformer, tokens_BxL: np.ndarray) -> np.ndarray:
    return np.asarray(_forward(model, jnp.asarray(tokens_BxL)))


TOKENS = np.random.default_rng(0).integers(0, V, (B, L))


@pytest.mark.parametrize("n_kv_heads, tie", [(4, True), (4, False), (2, True), (2, False)])
def test_import_export_round_trip(tmp_path, n_kv_heads, tie):
    reference = hf_model(n_kv_heads, tie)
    expected = hf_logits(reference, TOKENS)
    reference.save_pretrained(tmp_path / "hf", max_shard_size="40KB")  # sharded + index json
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()

    cfg = hf.config_from_hf(str(tmp_path / "hf"))
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.rope_base) == (4, n_kv_heads, 8, 500.0)
    assert cfg.tie_embeddings == tie
    model = load(str(tmp_path / "hf"))
    np.testing.assert_allclose(our_logits(model, TOKENS), expected, atol=1e-4)

    hf.export(model, cfg, str(tmp_path / "ours"))
    original = nnx.to_pure_dict(nnx.state(model))
    again = hf.load_params(str(tmp_path / "ours"), cfg)
    jax.tree.map(np.testing.assert_array_equal, original, again)  # exact

    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ours").eval()
    np.testing.assert_allclose(hf_logits(reloaded, TOKENS), expected, atol=1e-4)


def test_export_merges_lora(tmp_path):
    hf_model(2, True).save_pretrained(tmp_path / "hf")
    cfg = hf.config_from_hf(str(tmp_path / "hf"))
    cfg = dataclasses.replace(cfg, lora=config.Lora(2, 4.0, 0.0, ("q", "o", "down")))
    with nnx.use_eager_sharding(False):  # RBG init: threefry takes seconds to compile
        model = model_lib.Transformer(cfg, rngs=nnx.Rngs(params=jax.random.key(0, impl="rbg")))
    for name in ("q_lora_b", "o_lora_b", "down_lora_b"):
        b = getattr(model.layers, name)
        b[...] = jnp.asarray(0.1 * np.random.default_rng(1).normal(size=b[...].shape), jnp.float32)
    with_lora = our_logits(model, TOKENS)
    hf.export(model, cfg, str(tmp_path / "merged"))
    merged = load(str(tmp_path / "merged"))
    assert not nnx.state(merged, nnx.LoRAParam)
    np.testing.assert_allclose(our_logits(merged, TOKENS), with_lora, atol=1e-4)


def test_config_reads_legacy_rope_theta(tmp_path):
    hf_model(4, True).save_pretrained(tmp_path)
    hf_config = json.loads((tmp_path / "config.json").read_text())
    hf_config.pop("rope_parameters")
    hf_config["rope_theta"] = 1234.0
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    assert hf.config_from_hf(str(tmp_path)).rope_base == 1234.0
    hf_config["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0}
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    with pytest.raises(NotImplementedError, match="RoPE scaling"):
        hf.config_from_hf(str(tmp_path))


def test_hf_tokenizer(tokenizer_dir):
    """A checkpoint's tokenizer as a run reads it (`data.tokenizer='hf:DIR_OR_HUB_ID'`)."""
    tok = data.make_tokenizer(f"hf:{tokenizer_dir}")
    assert tok.vocab_size == 49_152
    ids = tok.encode("Early data exposure.")
    assert tok.decode(ids) == "Early data exposure."
    with pytest.raises(ValueError, match="not a local directory and not downloadable"):
        data.make_tokenizer("hf:no-such-org/no-such-tokenizer")
