"""Hugging Face Llama checkpoints (config.json + safetensors) and tokenizers.

Import and export go through numpy only (`safetensors.numpy`), so torch is not needed.
HF stores projections as (out_features, in_features) per layer; the model keeps them
transposed, split into heads and stacked over layers. HF Llama already uses the
rotate-half RoPE layout, so no q/k permutation is needed.
"""

import json
import os
import shutil
from collections.abc import Callable

import jax
import numpy as np
import safetensors.numpy
from flax import nnx
from jax.sharding import Mesh

from retention_jax import config, presets
from retention_jax import model as model_lib

_SINGLE, _INDEX = "model.safetensors", "model.safetensors.index.json"


def config_from_hf(path: str) -> config.Model:
    """Model config from a Llama config.json (rope_theta top level or in rope_parameters)."""
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    if hf.get("model_type") != "llama":
        raise ValueError(f"{path}: model_type={hf.get('model_type')!r}; only 'llama' is supported")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise NotImplementedError(f"{path}: RoPE scaling {rope} is not supported")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise NotImplementedError(f"{path}: attention/MLP biases are not supported")
    cfg = presets.smollm2_135m()
    cfg.update(
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads", hf["num_attention_heads"]),
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        d_mlp=hf["intermediate_size"],
        rope_base=float(rope.get("rope_theta", hf.get("rope_theta", 10_000.0))),
        norm_eps=hf["rms_norm_eps"],
        tie_embeddings=hf.get("tie_word_embeddings", True),
        init_std=hf.get("initializer_range", 0.02),
    )
    return config.parse_model(cfg)


def _layer_map(cfg: config.Model) -> dict[str, tuple[str, Callable, Callable]]:
    """Model layer weight -> (HF name template, HF->model, model->HF) for one layer."""
    d, h, kv, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    t = np.transpose
    return {
        "attn_norm": ("input_layernorm", lambda w: w, lambda w: w),
        "mlp_norm": ("post_attention_layernorm", lambda w: w, lambda w: w),
        "q": ("self_attn.q_proj", lambda w: t(w).reshape(d, h, hd), lambda w: t(w.reshape(d, -1))),
        "k": ("self_attn.k_proj", lambda w: t(w).reshape(d, kv, hd), lambda w: t(w.reshape(d, -1))),
        "v": ("self_attn.v_proj", lambda w: t(w).reshape(d, kv, hd), lambda w: t(w.reshape(d, -1))),
        "o": ("self_attn.o_proj", lambda w: t(w).reshape(h, hd, d), lambda w: t(w.reshape(-1, d))),
        "gate": ("mlp.gate_proj", t, t),
        "up": ("mlp.up_proj", t, t),
        "down": ("mlp.down_proj", t, t),
    }


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    if os.path.exists(os.path.join(path, _INDEX)):
        with open(os.path.join(path, _INDEX)) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(path, _SINGLE)):
        files = [_SINGLE]
    else:
        raise FileNotFoundError(f"{path}: neither {_SINGLE} nor {_INDEX}")
    tensors = {}
    for name in files:
        tensors.update(safetensors.numpy.load_file(os.path.join(path, name)))
    return tensors


def load_params(path: str, cfg: config.Model) -> dict:
    """Nested dict of numpy arrays shaped like `nnx.to_pure_dict(nnx.state(model))`."""
    hf = _read_safetensors(path)
    dtype = np.dtype(cfg.param_dtype)

    def get(name: str) -> np.ndarray:
        if name not in hf:
            raise KeyError(f"{path}: tensor {name!r} missing")
        return hf[name].astype(dtype)

    layers = {
        ours: np.stack(
            [to_ours(get(f"model.layers.{i}.{theirs}.weight")) for i in range(cfg.n_layers)]
        )
        for ours, (theirs, to_ours, _) in _layer_map(cfg).items()
    }
    params = {
        "embed": get("model.embed_tokens.weight"),
        "layers": layers,
        "final_norm": get("model.norm.weight"),
    }
    if not cfg.tie_embeddings:
        params["head"] = get("lm_head.weight").T
    return params


# Model config field -> the config.json key it is checked against (see `config_from_hf`).
_CHECKED = {
    "vocab_size": "vocab_size",
    "d_model": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "d_mlp": "intermediate_size",
    "tie_embeddings": "tie_word_embeddings",
    "rope_base": "rope_theta",
    "norm_eps": "rms_norm_eps",
}
_FILES = ("config.json", "*.safetensors", _INDEX)


def local_dir(spec: str) -> str:
    """`spec` itself if it is a directory, else the hub snapshot of its weights and config."""
    if os.path.isdir(spec):
        return spec
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(spec, allow_patterns=list(_FILES))
    except Exception as e:
        raise OSError(
            f"HF checkpoint {spec!r} is neither a local directory nor downloadable from the hub "
            f"(no network or HF_HUB_OFFLINE=1, and not in the local HF cache) "
            f"({type(e).__name__}: {e})"
        ) from e


def check_config(path: str, model_cfg: config.Model, key: str = "model") -> None:
    """Raises naming the first model field whose value the checkpoint at `path` contradicts."""
    theirs = config_from_hf(path)
    for field, hf_key in _CHECKED.items():
        mine, want = getattr(model_cfg, field), getattr(theirs, field)
        if want != mine:
            raise ValueError(
                f"config key {key}.{field}={mine!r}: the checkpoint {path} has "
                f"{hf_key}={want!r}; set {key}.{field} to it or use another checkpoint"
            )


def init_params(
    spec: str, model_cfg: config.Model, mesh: Mesh, rules: model_lib.Rules, *, seed: int = 0
) -> nnx.State:
    """A Hugging Face Llama checkpoint (hub id or directory) as the starting parameters of a
    stage: the state of `model_lib.abstract_state(model_cfg, mesh, rules)`, filled in.

    The checkpoint must match `model_cfg` (checked field by field). LoRA adapters, which a
    base checkpoint lacks, are initialised from `seed` as in a fresh model.
    """
    path = local_dir(spec)
    check_config(path, model_cfg)
    _, shapes = model_lib.abstract_state(model_cfg, mesh, rules)
    state = model_lib.put_pure(shapes, load_params(path, model_cfg))
    if model_cfg.lora.rank > 0:
        fresh = nnx.state(model_lib.create(model_cfg, mesh, rules, seed), model_lib.LoRAParam)
        state = nnx.merge_state(state, fresh)
    return state


def export(model_or_state: nnx.Module | nnx.State, cfg: config.Model, out_dir: str) -> None:
    """Write config.json + model.safetensors for `LlamaForCausalLM.from_pretrained`.

    LoRA adapters, if any, are merged into the base weights (W + alpha/rank * A @ B).
    """
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state)
    params = jax.tree.map(lambda a: np.asarray(a, np.float32), nnx.to_pure_dict(state))
    params, cfg = model_lib.merge_lora(params, cfg)
    params = jax.tree.map(lambda a: np.asarray(a, np.float32), params)
    layers = params["layers"]
    tensors = {
        "model.embed_tokens.weight": params["embed"],
        "model.norm.weight": params["final_norm"],
    }
    for ours, (theirs, _, to_hf) in _layer_map(cfg).items():
        w = layers[ours]
        for i in range(cfg.n_layers):
            tensors[f"model.layers.{i}.{theirs}.weight"] = to_hf(w[i])
    if not cfg.tie_embeddings:
        tensors["lm_head.weight"] = params["head"].T
    os.makedirs(out_dir, exist_ok=True)
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    safetensors.numpy.save_file(tensors, os.path.join(out_dir, _SINGLE), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(_hf_config(cfg), f, indent=2)


def _hf_config(cfg: config.Model) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.d_mlp,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        # transformers 5 reads rope_parameters; older releases read rope_theta.
        "rope_parameters": {"rope_theta": cfg.rope_base, "rope_type": "default"},
        "rope_theta": cfg.rope_base,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "max_position_embeddings": 8192,
        "attention_bias": False,
        "mlp_bias": False,
        "dtype": "float32",
    }


_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
)


def save_tokenizer(spec: str, out_dir: str) -> list[str]:
    """Writes the HF tokenizer files of a `data.tokenizer` spec into `out_dir`; their names.

    `hf:` tokenizers are copied; the built-in `byte` tokenizer is written as an equivalent
    byte-level BPE with no merges (ids 0 pad, 1 EOS, 2 + byte), so `AutoTokenizer` gives
    the ids the model was trained on.
    """
    os.makedirs(out_dir, exist_ok=True)
    if spec == "byte":
        return _save_byte_tokenizer(out_dir)
    scheme, _, name = spec.partition(":")
    if scheme != "hf":
        raise ValueError(
            f"config key data.tokenizer={spec!r}: export writes tokenizer files for 'byte' and "
            "'hf:HUB_ID_OR_DIR' tokenizers only"
        )
    if not os.path.isdir(name):
        from huggingface_hub import snapshot_download

        name = snapshot_download(name, allow_patterns=list(_TOKENIZER_FILES))
    written = []
    for file in _TOKENIZER_FILES:
        if os.path.exists(os.path.join(name, file)):
            shutil.copyfile(os.path.join(name, file), os.path.join(out_dir, file))
            written.append(file)
    if "tokenizer.json" not in written:
        raise FileNotFoundError(f"config key data.tokenizer={spec!r}: no tokenizer.json in {name}")
    return written


def _byte_chars() -> dict[int, str]:
    """Byte -> printable character, the byte-level BPE alphabet (printable bytes map to
    themselves, the others to code points from 256 up, in byte order)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    chars = {b: chr(b) for b in printable}
    chars.update({b: chr(256 + i) for i, b in enumerate(others)})
    return chars


def _save_byte_tokenizer(out_dir: str) -> list[str]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from retention_jax.data.tokenizer import ByteTokenizer

    pad, eos = "<pad>", "<eos>"
    vocab = {pad: ByteTokenizer.pad_id, eos: ByteTokenizer.eos_id}
    vocab.update({c: b + 2 for b, c in _byte_chars().items()})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([pad, eos])
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "pad_token": pad,
        "eos_token": eos,
        "model_max_length": 8192,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return ["tokenizer.json", "tokenizer_config.json"]
