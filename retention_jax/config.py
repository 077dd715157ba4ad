"""Validation of an experiment config before anything is built or compiled.

Every error names the key, the value and what is allowed. The data section is checked
by `data.validate`; this module checks the rest and the sweep.
"""

from typing import Any

import jax
import ml_collections as mlc

from retention_jax import data, sharding

STAGES = data.STAGES
DTYPES = ("float32", "bfloat16")
REMAT = ("none", "full", "dots")
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ValueError(f"config key {key}={value!r} is invalid; allowed: {allowed}")


def _int(cfg, key: str, path: str, low: int = 1) -> int:
    v = cfg[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        _fail(_join(path, key), v, f"an integer >= {low}")
    return v


def _num(cfg, key: str, path: str, low: float, high: float, *, open_high=False, open_low=False):
    v = cfg[key]
    ok = isinstance(v, int | float) and not isinstance(v, bool)
    ok = ok and (v > low if open_low else v >= low) and (v < high if open_high else v <= high)
    if not ok:
        _fail(
            _join(path, key),
            v,
            f"a number in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}",
        )
    return v


def _choice(cfg, key: str, path: str, allowed) -> None:
    if cfg[key] not in allowed:
        _fail(_join(path, key), cfg[key], " | ".join(map(str, allowed)))


def _model(m: mlc.ConfigDict, mesh: dict) -> None:
    for k in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_mlp"):
        _int(m, k, "model")
    if m.n_heads % m.n_kv_heads:
        _fail("model.n_kv_heads", m.n_kv_heads, f"a divisor of model.n_heads={m.n_heads}")
    _num(m, "rope_base", "model", 0, float("inf"), open_low=True)
    _num(m, "norm_eps", "model", 0, 1, open_low=True)
    _choice(m, "dtype", "model", DTYPES)
    _choice(m, "param_dtype", "model", DTYPES)
    _choice(m, "remat", "model", REMAT)
    for site in ("embed", "attn", "resid", "mlp"):
        _num(m.dropout, site, "model.dropout", 0, 1, open_high=True)
    if m.lora.rank != 0:
        _fail("model.lora.rank", m.lora.rank, "0 (LoRA stages are not implemented yet)")
    for t in m.lora.targets:
        if t not in LORA_TARGETS:
            _fail("model.lora.targets", tuple(m.lora.targets), f"a subset of {LORA_TARGETS}")
    tensor = mesh["tensor"]
    for k in ("n_heads", "n_kv_heads", "d_mlp", "vocab_size"):
        if m[k] % tensor:
            _fail(f"model.{k}", m[k], f"a multiple of mesh.tensor={tensor}")
    if m.d_model % mesh["fsdp"]:
        _fail("model.d_model", m.d_model, f"a multiple of mesh.fsdp={mesh['fsdp']}")


def _batch(cfg, key: str, path: str, rows: int) -> None:
    _int(cfg, key, path)
    if cfg[key] % rows:
        _fail(_join(path, key), cfg[key], f"a multiple of mesh data×fsdp={rows}")
    if cfg[key] % jax.process_count():
        _fail(_join(path, key), cfg[key], f"a multiple of process_count={jax.process_count()}")


def _optimizer(s: mlc.ConfigDict, path: str, rows: int) -> None:
    _batch(s, "batch", path, rows)
    if (s.batch // rows) % _int(s, "microbatches", path):
        _fail(
            f"{path}.microbatches",
            s.microbatches,
            f"a divisor of batch/(data×fsdp)={s.batch // rows}",
        )
    _num(s, "lr", path, 0, 1, open_low=True)
    _num(s, "min_lr", path, 0, s.lr)
    _int(s, "warmup_steps", path, 0)
    _num(s, "weight_decay", path, 0, 1)
    _num(s, "b1", path, 0, 1, open_high=True)
    _num(s, "b2", path, 0, 1, open_high=True)
    _num(s, "eps", path, 0, 1, open_low=True)
    _num(s, "clip_norm", path, 0, float("inf"), open_low=True)
    if not isinstance(s.decay_exclude, tuple | list) or not all(
        isinstance(w, str) for w in s.decay_exclude
    ):
        _fail(f"{path}.decay_exclude", s.decay_exclude, "a tuple of parameter-path substrings")


def _rules(rules) -> None:
    names = [r[0] for r in rules] if isinstance(rules, tuple | list) else []
    for rule in rules:
        ok = isinstance(rule, tuple | list) and len(rule) == 2 and isinstance(rule[0], str)
        axes = rule[1] if ok else None
        axes = (axes,) if isinstance(axes, str) else (axes or ())
        if not ok or any(a not in sharding.AXES for a in axes) or names.count(rule[0]) > 1:
            _fail("rules", rule, f"unique (logical name, None | mesh axes of {sharding.AXES})")


def assign(cfg: mlc.ConfigDict, path: str, value: Any) -> None:
    """Sets a dotted config path ("pretrain.exposure.lam") to `value`."""
    *head, last = path.split(".")
    node = cfg
    for key in head:
        node = node[key]
    node[last] = value


def _has_path(cfg: mlc.ConfigDict, path: str) -> bool:
    node = cfg
    for key in path.split("."):
        if not isinstance(node, mlc.ConfigDict) or key not in node:
            return False
        node = node[key]
    return True


# Config paths each stage's sweep may set: a stage's nodes differ only in what they own.
SWEEPABLE = {
    "pretrain": ("seed", "model.", "data.", "pretrain."),
    "posttrain": ("posttrain.",),
    "finetune": ("finetune.",),
}


def _sweep(cfg: mlc.ConfigDict) -> None:
    if set(cfg.sweep.keys()) != set(STAGES):
        _fail("sweep", sorted(cfg.sweep.keys()), f"exactly the sections {STAGES}")
    for name in STAGES:
        pairs = cfg.sweep[name]
        if not isinstance(pairs, tuple | list) or not all(
            isinstance(p, tuple | list) and len(p) == 2 for p in pairs
        ):
            _fail(f"sweep.{name}", pairs, "a tuple of (dotted config path, values) pairs")
        for path, values in pairs:
            if not _has_path(cfg, path):
                _fail(f"sweep.{name}", path, "dotted paths of existing config keys")
            if not path.startswith(SWEEPABLE[name]):
                _fail(f"sweep.{name}", path, f"paths under {SWEEPABLE[name]}")
            if not isinstance(values, list | tuple) or not values:
                _fail(f"sweep.{name}.{path}", values, "a non-empty list of values")


def validate(cfg: mlc.ConfigDict, num_devices: int | None = None) -> None:
    """Raises ValueError on the first invalid key; builds and compiles nothing."""
    for section in ("model", "mesh", "data", *STAGES, "sweep", "eval", "ckpt", "log"):
        if section not in cfg:
            _fail(section, None, "a section present in the config (see configs/base.py)")
    for axis in sharding.AXES:
        if axis not in cfg.mesh:
            _fail(f"mesh.{axis}", None, "a positive size or -1")
    _rules(cfg.rules)
    shape = sharding.mesh_shape(cfg.mesh, num_devices or jax.device_count())
    mesh = dict(zip(sharding.AXES, shape))
    rows = mesh["data"] * mesh["fsdp"]
    _int(cfg, "seed", "", 0)
    _model(cfg.model, mesh)
    for name in STAGES:
        _optimizer(cfg[name], name, rows)
    _num(cfg.posttrain, "dropout", "posttrain", 0, 1, open_high=True)
    es = cfg.posttrain.early_stop
    _int(es, "every", "posttrain.early_stop", 0)
    _int(es, "patience", "posttrain.early_stop", 0)
    _num(es, "min_delta", "posttrain.early_stop", 0, float("inf"))
    _batch(cfg.eval, "batch", "eval", rows)
    _int(cfg.ckpt, "every", "ckpt")
    _int(cfg.log, "every", "log")
    _sweep(cfg)
    data.validate(cfg)
