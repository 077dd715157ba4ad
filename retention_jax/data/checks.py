"""`validate(cfg)`: every data key and every stage data key, before anything runs.

Pure: reads the config only (no files, no tokenizing). Each error names the key, the
value and what is allowed.
"""

import numbers

from retention_jax.data import builtin, sources

DOMAINS = ("pre", "post", "ft")  # fixed order: batch["domain"] indexes it
STAGES = ("pretrain", "posttrain", "finetune")
PACKINGS = ("concat", "first_fit")
MODES = ("add", "replace")


def get(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        try:
            node = node[part]
        except (KeyError, AttributeError, TypeError) as e:
            raise ValueError(f"config key {dotted} is missing") from e
    return node


def _int(cfg, key: str, lo: int = 0):
    v = get(cfg, key)
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo:
        raise ValueError(f"{key}={v!r}: must be an int >= {lo}")
    return int(v)


def _frac(cfg, key: str, lo_open: bool = False, hi_open: bool = False):
    v = get(cfg, key)
    ok = isinstance(v, numbers.Real) and not isinstance(v, bool)
    ok = ok and (v > 0 if lo_open else v >= 0) and (v < 1 if hi_open else v <= 1)
    if not ok:
        lo, hi = "(0" if lo_open else "[0", "1)" if hi_open else "1]"
        raise ValueError(f"{key}={v!r}: must be a number in {lo}, {hi}")
    return float(v)


def validate(cfg) -> None:
    """Raise ValueError naming key, value and what is allowed for any bad data setting."""
    tok = get(cfg, "data.tokenizer")
    if not (
        tok == "byte"
        or (
            isinstance(tok, str)
            and tok.partition(":")[0] in ("hf", "spm")
            and tok.partition(":")[2]
        )
    ):
        raise ValueError(
            f"data.tokenizer={tok!r}: allowed 'byte', 'hf:HUB_ID_OR_DIR', 'spm:MODEL_FILE'"
        )
    seq_len = _int(cfg, "data.seq_len", 2)
    packing = get(cfg, "data.packing")
    if packing not in PACKINGS:
        raise ValueError(f"data.packing={packing!r}: allowed {list(PACKINGS)}")
    cache = get(cfg, "data.cache_dir")
    if not isinstance(cache, str):
        raise ValueError(f"data.cache_dir={cache!r}: must be a string ('' -> <workdir>/data_cache)")
    _frac(cfg, "data.val_fraction", lo_open=True, hi_open=True)
    if _int(cfg, "data.val_tokens", 1) < seq_len:
        raise ValueError(
            f"data.val_tokens={get(cfg, 'data.val_tokens')!r}: must be >= data.seq_len={seq_len}"
        )
    for d in DOMAINS:
        dom = get(cfg, f"data.{d}")
        for field in ("source", "name", "text"):
            v = get(cfg, f"data.{d}.{field}")
            if not isinstance(v, str) or not v:
                raise ValueError(f"data.{d}.{field}={v!r}: must be a non-empty string")
        scheme, arg = sources.parse(dom["source"], f"data.{d}.source")
        if scheme == "builtin":
            builtin.check_options(arg, dict(dom.get("options") or {}), f"data.{d}.options")
    pool = _int(cfg, "data.post_pool_tokens", seq_len)
    _int(cfg, "data.ft_pool_tokens", seq_len)
    _int(cfg, "data.workers", 0)

    pre_tokens = _int(cfg, "pretrain.tokens", 0)
    for s in STAGES:
        _int(cfg, f"{s}.batch", 1)
    lam = _frac(cfg, "pretrain.exposure.lam")
    mode = get(cfg, "pretrain.exposure.mode")
    if mode not in MODES:
        raise ValueError(f"pretrain.exposure.mode={mode!r}: allowed {list(MODES)}")
    window = get(cfg, "pretrain.exposure.window")
    try:
        a, b = (float(x) for x in window)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"pretrain.exposure.window={window!r}: must be (start, end) fractions"
        ) from e
    if not 0.0 <= a < b <= 1.0:
        raise ValueError(f"pretrain.exposure.window={window!r}: need 0 <= start < end <= 1")
    q, p = pre_tokens // seq_len, pool // seq_len
    e = round_half_up(lam * p)
    total = q + e if mode == "add" else q
    if mode == "replace" and e > q:
        raise ValueError(
            f"pretrain.exposure.lam={lam!r}: replace mode needs "
            "lam*post_pool_tokens <= pretrain.tokens "
            f"({e} > {q} sequences)"
        )
    w = int(b * total) - int(a * total)
    if e > w:
        raise ValueError(
            f"pretrain.exposure.window={window!r}: holds {w} sequences, fewer than the {e} exposed "
            f"(lam={lam}); widen the window or lower lam"
        )
    replay = _frac(cfg, "posttrain.replay", hi_open=True)
    if replay > 0 and q == 0:
        raise ValueError(
            f"posttrain.replay={replay!r}: needs pretrain.tokens >= data.seq_len to replay D_pre"
        )
    cm = get(cfg, "posttrain.compute_matched")
    if not isinstance(cm, bool):
        raise ValueError(f"posttrain.compute_matched={cm!r}: must be True or False")
    _int(cfg, "posttrain.max_tokens", 0)
    _int(cfg, "finetune.tokens", 0)
    _int(cfg, "seed", 0)


def round_half_up(x: float) -> int:
    """Rounding used for every count in the data layer (half up, not banker's)."""
    return int(x + 0.5)
