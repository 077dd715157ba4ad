"""The one boundary where an ml_collections experiment config becomes typed, frozen sections.

ml_collections stays the file and `--config.key=value` surface; `parse` converts a config
once into an `Experiment` of frozen dataclasses and validates every key on the way, before
anything is built or compiled. Lower layers receive the section they need. Every error has
one grammar: `config key <path>=<value>: <what is allowed>`.

The stage table `STAGES` is the one place that says what distinguishes the three stages.
"""

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import ml_collections as mlc

from retention_jax.errors import MISSING, fail

DOMAINS = ("pre", "post", "ft")  # fixed order: batch["domain"] indexes it
MESH_AXES = ("data", "fsdp", "tensor")
DTYPES = ("float32", "bfloat16")
REMAT = ("none", "full", "dots")
ATTENTION = ("auto", "einsum", "einsum_vjp", "xla", "cudnn", "splash")
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down", "head")
PACKINGS = ("concat", "first_fit")
EXPOSURE_MODES = ("add", "replace")
TOKENIZER_SCHEMES = ("hf", "spm")


def round_half_up(x: float) -> int:
    """The rounding of every count derived from a fraction (half up, not banker's)."""
    return int(x + 0.5)


# ----------------------------------------------------------------------------- the stages


@dataclasses.dataclass(frozen=True)
class StageKind:
    name: str
    sweepable: tuple[str, ...]  # config path prefixes the stage's sweep may set
    owns_dropout: bool  # the stage's `dropout` replaces the model's at all four sites
    early_stopping: bool  # may stop on D_post validation loss (unless compute-matched)


STAGES = ("pretrain", "posttrain", "finetune")
# Set per replicate by `replicate` (never swept), so every comparison pairs within one.
SEED_PATHS = ("seed", "data.seed", "posttrain.seed")
STAGE_KINDS = {
    "pretrain": StageKind("pretrain", ("model.", "data.", "pretrain."), False, False),
    "posttrain": StageKind("posttrain", ("posttrain.",), True, True),
    "finetune": StageKind("finetune", ("finetune.",), False, False),
}


# ----------------------------------------------------------------------------- sections


@dataclasses.dataclass(frozen=True)
class Dropout:
    embed: float
    attn: float
    resid: float
    mlp: float


@dataclasses.dataclass(frozen=True)
class Lora:
    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]


NO_LORA = Lora(0, 1.0, 0.0, ())


@dataclasses.dataclass(frozen=True)
class Model:
    """A decoder's shape and numerics; hashable, so it can be static in a compiled program."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_mlp: int
    rope_base: float
    norm_eps: float
    tie_embeddings: bool
    init_std: float
    param_dtype: str
    dtype: str
    remat: str
    scan_layers: bool
    scan_unroll: int  # layers per scan iteration; 0: by backend (model.layer_unroll)
    attention: str  # an implementation or "auto" (model.attention_impl)
    loss_chunk: int  # positions per cross-entropy chunk; 0: all logits at once
    dropout: Dropout
    lora: Lora


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """AdamW with linear warmup and cosine decay to `min_lr` (clamped to `lr`)."""

    lr: float
    min_lr: float
    warmup_steps: int
    warmup_fraction: float  # > 0: warmup is this fraction of the stage's steps instead
    horizon_tokens: int  # > 0: the cosine reaches min_lr after this many tokens
    weight_decay: float
    b1: float
    b2: float
    eps: float
    clip_norm: float
    decay_exclude: tuple[str, ...]
    microbatches: int  # gradient accumulation inside one step (resolved from microbatch_rows)
    allow_unreached_peak: bool  # accept a warmup as long as the stage (the LR never peaks)

    def static(self) -> dict:
        """The keys that shape the compiled program; the rest are traced hyperparameters."""
        return {
            "b1": self.b1,
            "b2": self.b2,
            "eps": self.eps,
            "clip_norm": self.clip_norm,
            "decay_exclude": self.decay_exclude,
            "microbatches": self.microbatches,
        }

    def schedule(self, num_steps: int, tokens_per_step: int) -> dict:
        """Resolved schedule of a stage of `num_steps`: peak, floor, warmup and horizon."""
        warmup = self.warmup_steps
        if self.warmup_fraction > 0:
            warmup = round_half_up(self.warmup_fraction * num_steps)
        horizon = num_steps
        if self.horizon_tokens > 0:
            horizon = -(-self.horizon_tokens // tokens_per_step)
        return {
            "lr": self.lr,
            "min_lr": min(self.min_lr, self.lr),
            "warmup_steps": warmup,
            "total_steps": horizon,
            "weight_decay": self.weight_decay,
        }


@dataclasses.dataclass(frozen=True)
class Exposure:
    lam: float
    mode: str
    window: tuple[float, float]


@dataclasses.dataclass(frozen=True)
class EarlyStop:
    every: int  # 0 disables it
    patience: int
    min_delta: float


@dataclasses.dataclass(frozen=True)
class Pretrain:
    tokens: int
    batch: int
    exposure: Exposure
    optimizer: Optimizer
    init: str = ""  # "hf:HUB_ID_OR_DIR": start from a Hugging Face Llama checkpoint


@dataclasses.dataclass(frozen=True)
class Posttrain:
    lora: Lora  # rank > 0: train adapters only (merged into the weights before stage 3)
    seed: int  # data order and dropout of stage 2 (resolved: -1 in a file is the experiment seed)
    batch: int
    max_tokens: int
    dropout: float
    replay: float
    compute_matched: bool
    early_stop: EarlyStop
    optimizer: Optimizer


@dataclasses.dataclass(frozen=True)
class Finetune:
    tokens: int
    batch: int
    optimizer: Optimizer


@dataclasses.dataclass(frozen=True)
class Forecast:
    """The retention forecast's probes at θ_post (retention_jax/forecast.py)."""

    probes: bool  # computed at the end of every post-training node
    rows: int  # rows of the first validation batch of D_post and of D_ft
    power_iters: int  # power iterations for the top Hessian eigenvalue
    hutchinson: int  # Rademacher samples of the Hessian trace
    lookahead: float  # k: this fraction of the stage-3 steps (at least one)
    seed: int
    lrs: tuple[float, ...]  # the graph's stage-3 LRs (sweep.finetune's finetune.lr)


@dataclasses.dataclass(frozen=True)
class Domain:
    source: str
    name: str
    text: str
    options: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Data:
    tokenizer: str
    seq_len: int
    packing: str
    cache_dir: str
    val_fraction: float
    val_tokens: int
    pre: Domain
    post: Domain
    ft: Domain
    post_pool_tokens: int
    ft_pool_tokens: int
    seed: int  # orders the source's blocks: which documents make a store (and its pools)
    workers: int  # tokenizing processes of the prepare step; 0: one per core
    read_threads: int  # grain read threads of the loader; 0 reads in the calling thread

    def domain(self, name: str) -> Domain:
        return getattr(self, name)


@dataclasses.dataclass(frozen=True)
class Experiment:
    """One node's whole config, typed; `stage(name)` and `model_for(name)` give sections."""

    seed: int
    model: Model
    mesh: Mapping[str, int]
    rules: tuple[tuple[str, str | tuple[str, ...] | None], ...]
    data: Data
    pretrain: Pretrain
    posttrain: Posttrain
    finetune: Finetune
    eval_batch: int
    ckpt_every: int
    ckpt_every_minutes: float  # > 0: also checkpoint after this much wall time
    log_every: int
    forecast: Forecast
    eval_every: int = 0  # validation of every domain; 0: at each ckpt_every
    profile_steps: tuple[int, int] | None = None  # (first, last) step traced, inclusive

    def stage(self, name: str) -> Pretrain | Posttrain | Finetune:
        return getattr(self, name)

    def model_for(self, name: str) -> Model:
        """The model a stage trains: post-training applies its dropout at all four sites
        and carries its LoRA adapters; fine-tuning gets them merged (`model.merge_lora`:
        a head adapter on tied embeddings unties the head)."""
        lora = self.posttrain.lora
        if name == "finetune" and lora.rank > 0 and "head" in lora.targets:
            return dataclasses.replace(self.model, tie_embeddings=False)
        if not STAGE_KINDS[name].owns_dropout:
            return self.model
        rate = self.posttrain.dropout
        return dataclasses.replace(
            self.model,
            dropout=Dropout(rate, rate, rate, rate),
            lora=lora if lora.rank > 0 else self.model.lora,  # rank 0: the same program
        )

    def stage_seed(self, name: str) -> int:
        """The seed of a stage's data order and dropout (stage 2 may set its own)."""
        return self.posttrain.seed if name == "posttrain" else self.seed

    def early_stopping(self, name: str) -> bool:
        es = self.posttrain.early_stop
        return (
            STAGE_KINDS[name].early_stopping and es.every > 0 and not self.posttrain.compute_matched
        )


# ----------------------------------------------------------------------------- reading


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class _Section:
    """Reads the keys of one config section; `done()` rejects the keys nobody read."""

    def __init__(self, node: Any, path: str):
        if not isinstance(node, Mapping | mlc.ConfigDict):
            fail(path, node, "a section (a dict of keys)")
        self.node, self.path, self.seen = node, path, set()

    def raw(self, key: str) -> Any:
        self.seen.add(key)
        if key not in self.node:
            fail(_join(self.path, key), MISSING, "a required key (see configs/base.py)")
        return self.node[key]

    def key(self, key: str) -> str:
        return _join(self.path, key)

    def int(self, key: str, low: int = 0) -> int:
        v = self.raw(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            fail(self.key(key), v, f"an integer >= {low}")
        return int(v)

    def seed(self, key: str) -> int:
        """A seed: JAX keys (32-bit without x64) take it modulo 2**32, so larger ones alias."""
        v = self.raw(key)
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**32:
            fail(self.key(key), v, "an integer in [0, 2**32)")
        return int(v)

    def num(self, key: str, low: float, high: float, *, open_low=False, open_high=False) -> float:
        v = self.raw(key)
        ok = isinstance(v, int | float) and not isinstance(v, bool)
        ok = ok and (v > low if open_low else v >= low) and (v < high if open_high else v <= high)
        if not ok:
            lo, hi = "(" if open_low else "[", ")" if open_high else "]"
            fail(self.key(key), v, f"a number in {lo}{low}, {high}{hi}")
        return float(v)

    def choice(self, key: str, allowed: tuple) -> Any:
        v = self.raw(key)
        if v not in allowed:
            fail(self.key(key), v, " | ".join(map(str, allowed)))
        return v

    def bool(self, key: str) -> bool:
        v = self.raw(key)
        if not isinstance(v, bool):
            fail(self.key(key), v, "True or False")
        return v

    def str(self, key: str, *, empty: bool = False) -> str:
        v = self.raw(key)
        if not isinstance(v, str) or (not v and not empty):
            fail(self.key(key), v, "a string" if empty else "a non-empty string")
        return v

    def strings(self, key: str, what: str) -> tuple[str, ...]:
        v = self.raw(key)
        if not isinstance(v, tuple | list) or not all(isinstance(w, str) for w in v):
            fail(self.key(key), v, f"a tuple of {what}")
        return tuple(v)

    def section(self, key: str) -> "_Section":
        return _Section(self.raw(key), self.key(key))

    def done(self, extra: tuple[str, ...] = ()) -> None:
        unknown = sorted(set(self.node.keys()) - self.seen - set(extra))
        if unknown:
            fail(
                self.key(unknown[0]),
                self.node[unknown[0]],
                f"a known key of {self.path or 'the config'}; known: {sorted(self.seen)}",
            )


# ----------------------------------------------------------------------------- sections


def parse_model(node: Any, mesh: Mapping[str, int] | None = None, path: str = "model") -> Model:
    """A model section (a preset from `retention_jax.presets`, possibly overridden)."""
    s = _Section(node, path)
    ints = {
        k: s.int(k, 1)
        for k in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_mlp")
    }
    if ints["n_heads"] % ints["n_kv_heads"]:
        fail(
            s.key("n_kv_heads"),
            ints["n_kv_heads"],
            f"a divisor of {path}.n_heads={ints['n_heads']}",
        )
    d = s.section("dropout")
    dropout = Dropout(*(d.num(k, 0, 1, open_high=True) for k in ("embed", "attn", "resid", "mlp")))
    d.done()
    # Adapters are stage 2's (posttrain.lora); a model section holds them only in a run
    # record (identity) of a LoRA stage.
    lora = _lora(s.section("lora")) if "lora" in node else NO_LORA
    model = Model(
        **ints,
        rope_base=s.num("rope_base", 0, math.inf, open_low=True),
        norm_eps=s.num("norm_eps", 0, 1, open_low=True),
        tie_embeddings=s.bool("tie_embeddings"),
        init_std=s.num("init_std", 0, math.inf, open_low=True),
        param_dtype=s.choice("param_dtype", DTYPES),
        dtype=s.choice("dtype", DTYPES),
        remat=s.choice("remat", REMAT),
        scan_layers=s.bool("scan_layers"),
        scan_unroll=s.int("scan_unroll", 0),
        attention=s.choice("attention", ATTENTION),
        loss_chunk=s.int("loss_chunk", 0),
        dropout=dropout,
        lora=lora,
    )
    if model.attention not in ("auto", "einsum", "einsum_vjp") and dropout.attn > 0:
        fail(
            s.key("attention"),
            model.attention,
            f"auto | einsum | einsum_vjp while {path}.dropout.attn > 0 "
            "(attention-probability dropout)",
        )
    s.done()
    if mesh is not None:
        for k in ("n_heads", "n_kv_heads", "d_mlp", "vocab_size"):
            if getattr(model, k) % mesh["tensor"]:
                fail(s.key(k), getattr(model, k), f"a multiple of mesh.tensor={mesh['tensor']}")
        if model.d_model % mesh["fsdp"]:
            fail(s.key("d_model"), model.d_model, f"a multiple of mesh.fsdp={mesh['fsdp']}")
    return model


def parse_optimizer(node: Any, path: str, rows: int = 1) -> Optimizer:
    """The optimizer keys of one stage section (`pretrain`, ...), typed and validated;
    the microbatches resolve against the section's own batch over `rows` (data×fsdp)."""
    s = _Section(node, path)
    return _optimizer(s, s.int("batch", 1) // rows)


def _lora(lo: _Section) -> Lora:
    lora = Lora(
        rank=lo.int("rank", 0),
        alpha=lo.num("alpha", 0, math.inf, open_low=True),
        dropout=lo.num("dropout", 0, 1, open_high=True),
        targets=lo.strings("targets", "LoRA target names"),
    )
    lo.done()
    if bad := [t for t in lora.targets if t not in LORA_TARGETS]:
        fail(lo.key("targets"), lora.targets, f"a subset of {LORA_TARGETS} (not {bad})")
    if lora.rank > 0 and not lora.targets:
        fail(lo.key("targets"), lora.targets, "at least one target when rank > 0")
    return lora


def _optimizer(s: _Section, device_rows: int) -> Optimizer:
    lr = s.num("lr", 0, 1, open_low=True)
    return Optimizer(
        lr=lr,
        min_lr=s.num("min_lr", 0, 1),
        warmup_steps=s.int("warmup_steps", 0),
        warmup_fraction=s.num("warmup_fraction", 0, 1),
        horizon_tokens=s.int("horizon_tokens", 0),
        weight_decay=s.num("weight_decay", 0, 1),
        b1=s.num("b1", 0, 1, open_high=True),
        b2=s.num("b2", 0, 1, open_high=True),
        eps=s.num("eps", 0, 1, open_low=True),
        clip_norm=s.num("clip_norm", 0, math.inf, open_low=True),
        decay_exclude=s.strings("decay_exclude", "parameter-path substrings"),
        microbatches=_microbatches(s, device_rows),
        allow_unreached_peak=s.bool("allow_unreached_peak"),
    )


def _batch(s: _Section, key: str, rows: int, processes: int) -> int:
    v = s.int(key, 1)
    if v % rows:
        fail(s.key(key), v, f"a multiple of mesh data×fsdp={rows}")
    if v % processes:
        fail(s.key(key), v, f"a multiple of process_count={processes}")
    return v


def _microbatches(s: _Section, device_rows: int) -> int:
    """Gradient-accumulation steps of a stage whose batch gives each device `device_rows`
    rows: `microbatches` as set, or the fewest that keep a device's share of one
    microbatch within `microbatch_rows` (so one setting fits a node and a pod alike)."""
    n, cap = s.int("microbatches", 1), s.int("microbatch_rows", 0)
    if cap:
        if n != 1:
            fail(
                s.key("microbatch_rows"), cap, f"0 when microbatches={n} is set (one or the other)"
            )
        return next(
            d for d in range(1, device_rows + 1) if not device_rows % d and device_rows // d <= cap
        )
    if device_rows % n:
        fail(s.key("microbatches"), n, f"a divisor of batch/(data×fsdp)={device_rows}")
    return n


def _domain(s: _Section) -> Domain:
    """A domain's keys; what its source accepts is the data layer's to check
    (`data.sources.check`, called as the graph expands)."""
    options = s.raw("options") or {}
    if not isinstance(options, Mapping | mlc.ConfigDict):
        fail(s.key("options"), options, "a dict of source options")
    d = Domain(s.str("source"), s.str("name"), s.str("text"), dict(options))
    s.done()
    return d


def _data(s: _Section) -> Data:
    tok = s.raw("tokenizer")
    scheme, _, arg = str(tok).partition(":")
    if not (tok == "byte" or (isinstance(tok, str) and scheme in TOKENIZER_SCHEMES and arg)):
        fail(s.key("tokenizer"), tok, "'byte' | 'hf:HUB_ID_OR_DIR' | 'spm:MODEL_FILE'")
    seq_len = s.int("seq_len", 2)
    val_tokens = s.int("val_tokens", 1)
    if val_tokens < seq_len:
        fail(s.key("val_tokens"), val_tokens, f"an integer >= data.seq_len={seq_len}")
    d = Data(
        tokenizer=tok,
        seq_len=seq_len,
        packing=s.choice("packing", PACKINGS),
        cache_dir=s.str("cache_dir", empty=True),
        val_fraction=s.num("val_fraction", 0, 1, open_low=True, open_high=True),
        val_tokens=val_tokens,
        **{name: _domain(s.section(name)) for name in DOMAINS},
        post_pool_tokens=s.int("post_pool_tokens", seq_len),
        ft_pool_tokens=s.int("ft_pool_tokens", seq_len),
        seed=s.seed("seed"),
        workers=s.int("workers", 0),
        read_threads=s.int("read_threads", 0),
    )
    s.done()
    return d


def _rules(rules: Any) -> tuple:
    ok_shape = isinstance(rules, tuple | list)
    names = [r[0] for r in rules if isinstance(r, tuple | list) and r] if ok_shape else []
    if not ok_shape:
        fail("rules", rules, "a tuple of (logical name, mesh axes) pairs")
    out = []
    for rule in rules:
        ok = isinstance(rule, tuple | list) and len(rule) == 2 and isinstance(rule[0], str)
        axes = rule[1] if ok else None
        axes = (axes,) if isinstance(axes, str) else (axes or ())
        if not ok or any(a not in MESH_AXES for a in axes) or names.count(rule[0]) > 1:
            fail("rules", rule, f"unique (logical name, None | mesh axes of {MESH_AXES})")
        out.append((rule[0], tuple(rule[1]) if isinstance(rule[1], list) else rule[1]))
    return tuple(out)


def mesh_shape(sizes: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Resolves one -1 entry to the devices left over; checks the product."""
    shape = {a: sizes[a] for a in MESH_AXES}
    for axis, n in shape.items():
        if isinstance(n, bool) or not isinstance(n, int) or n == 0 or n < -1:
            fail(f"mesh.{axis}", n, "a positive size or -1")
    if list(shape.values()).count(-1) > 1:
        fail("mesh", dict(shape), "at most one axis of -1")
    known = math.prod(n for n in shape.values() if n != -1)
    for axis, n in shape.items():
        if n == -1:
            if num_devices % known:
                fail(
                    "mesh",
                    dict(sizes),
                    f"fixed axes whose product ({known}) divides the {num_devices} devices",
                )
            shape[axis] = num_devices // known
    if math.prod(shape.values()) != num_devices:
        fail(
            "mesh",
            dict(sizes),
            f"sizes whose product ({math.prod(shape.values())}) is "
            f"the {num_devices} devices available",
        )
    return shape


def smallest_devices(sizes: Mapping[str, int]) -> int:
    """The fewest devices a mesh config accepts (its fixed axes; -1 axes of size 1)."""
    return math.prod(n for n in sizes.values() if isinstance(n, int) and n > 0)


def _pretrain(s: _Section, rows: int, processes: int) -> Pretrain:
    ex = s.section("exposure")
    window = ex.raw("window")
    try:
        a, b = (float(x) for x in window)
    except (TypeError, ValueError):
        fail(ex.key("window"), window, "(start, end) fractions of the stage")
    if not 0.0 <= a < b <= 1.0:
        fail(ex.key("window"), window, "(start, end) with 0 <= start < end <= 1")
    exposure = Exposure(ex.num("lam", 0, 1), ex.choice("mode", EXPOSURE_MODES), (a, b))
    ex.done()
    batch = _batch(s, "batch", rows, processes)
    init = s.str("init", empty=True)
    if init and not (init.startswith("hf:") and init[3:]):
        fail(s.key("init"), init, "'' (a fresh initialisation) or 'hf:HUB_ID_OR_DIR'")
    out = Pretrain(s.int("tokens", 0), batch, exposure, _optimizer(s, batch // rows), init)
    s.done()
    return out


def _posttrain(s: _Section, rows: int, processes: int, seed: int) -> Posttrain:
    """Stage 2; its `seed` -1 means the experiment's `seed`."""
    es = s.section("early_stop")
    early = EarlyStop(es.int("every", 0), es.int("patience", 0), es.num("min_delta", 0, math.inf))
    es.done()
    own_seed = s.raw("seed")
    if own_seed != -1:
        own_seed = s.seed("seed")
    lora = _lora(s.section("lora"))
    batch = _batch(s, "batch", rows, processes)
    out = Posttrain(
        lora=lora,
        seed=seed if own_seed == -1 else own_seed,
        batch=batch,
        max_tokens=s.int("max_tokens", 0),
        dropout=s.num("dropout", 0, 1, open_high=True),
        replay=s.num("replay", 0, 1, open_high=True),
        compute_matched=s.bool("compute_matched"),
        early_stop=early,
        optimizer=_optimizer(s, batch // rows),
    )
    s.done()
    return out


def parse(cfg: mlc.ConfigDict, num_devices: int, num_processes: int = 1) -> Experiment:
    """The typed, validated experiment of `cfg` (the sweep is checked by `check_sweep`)."""
    root = _Section(cfg, "")
    m = root.section("mesh")
    for axis in MESH_AXES:
        m.raw(axis)
    m.done()
    mesh = mesh_shape(cfg.mesh, num_devices)
    rows = mesh["data"] * mesh["fsdp"]
    rules = _rules(root.raw("rules"))
    seed = root.seed("seed")
    model = parse_model(root.raw("model"), mesh)
    data = _data(root.section("data"))
    s1, s2, s3 = (root.section(name) for name in STAGES)
    pretrain = _pretrain(s1, rows, num_processes)
    posttrain = _posttrain(s2, rows, num_processes, seed)
    b3 = _batch(s3, "batch", rows, num_processes)
    finetune = Finetune(s3.int("tokens", 0), b3, _optimizer(s3, b3 // rows))
    s3.done()
    ev, ck, lg = root.section("eval"), root.section("ckpt"), root.section("log")
    pr = root.section("profile")
    exp = Experiment(
        seed=seed,
        model=model,
        mesh=mesh,
        rules=rules,
        data=data,
        pretrain=pretrain,
        posttrain=posttrain,
        finetune=finetune,
        eval_batch=_batch(ev, "batch", rows, num_processes),
        ckpt_every=ck.int("every", 1),
        ckpt_every_minutes=ck.num("every_minutes", 0, math.inf),
        log_every=lg.int("every", 1),
        eval_every=ev.int("every", 0),
        profile_steps=_profile_steps(pr),
        forecast=_forecast(root.section("forecast"), cfg, finetune.optimizer.lr),
    )
    for s in (ev, ck, lg, pr):
        s.done()
    root.done(extra=("sweep", "replicates", "replicate_pools"))
    _check_budgets(exp)
    return exp


def _forecast(s: _Section, cfg: mlc.ConfigDict, ft_lr: float) -> Forecast:
    """The forecast section; its LRs are those sweep.finetune gives finetune.lr (or the
    one finetune.lr)."""
    lrs = (ft_lr,)
    for paths, values in cfg.sweep.finetune if "sweep" in cfg else ():
        if paths == "finetune.lr":
            lrs = tuple(values)
        elif isinstance(paths, tuple | list) and "finetune.lr" in paths:
            lrs = tuple(v[list(paths).index("finetune.lr")] for v in values)
    f = Forecast(
        s.bool("probes"),
        s.int("rows", 1),
        s.int("power_iters", 1),
        s.int("hutchinson", 1),
        s.num("lookahead", 0, 1, open_low=True),
        s.seed("seed"),
        tuple(sorted(float(lr) for lr in lrs)),
    )
    s.done()
    return f


def _profile_steps(s: _Section) -> tuple[int, int] | None:
    steps = s.raw("steps")
    try:
        first, last = (int(x) for x in steps)
    except (TypeError, ValueError):
        fail(s.key("steps"), steps, "(first, last) steps to trace, or (0, 0): none")
    if (first, last) == (0, 0):
        return None
    if not 1 <= first <= last:
        fail(s.key("steps"), steps, "(first, last) with 1 <= first <= last, or (0, 0): none")
    return first, last


def _check_budgets(exp: Experiment) -> None:
    """Cross-section checks of the data budgets, in whole sequences (the plans' unit)."""
    s = exp.data.seq_len
    q, p = exp.pretrain.tokens // s, exp.data.post_pool_tokens // s
    ex = exp.pretrain.exposure
    e = round_half_up(ex.lam * p)
    if ex.mode == "replace" and e > q:
        fail(
            "pretrain.exposure.lam",
            ex.lam,
            f"at most pretrain.tokens/data.post_pool_tokens in replace mode ({e} > {q} sequences)",
        )
    total = q + e if ex.mode == "add" else q
    width = int(ex.window[1] * total) - int(ex.window[0] * total)
    if e > width:
        fail(
            "pretrain.exposure.window",
            ex.window,
            f"a window holding the {e} exposed sequences (it holds {width}); widen it or lower lam",
        )
    if exp.finetune.tokens < s:  # 0 steps: every leaf would report L_ret = L_im
        fail("finetune.tokens", exp.finetune.tokens, f"at least data.seq_len={s} (one sequence)")
    batch_tokens = exp.posttrain.batch * s
    if not exp.posttrain.compute_matched and exp.posttrain.max_tokens < batch_tokens:
        fail(
            "posttrain.max_tokens",
            exp.posttrain.max_tokens,
            f"at least one batch of posttrain.batch × data.seq_len = {batch_tokens} tokens",
        )
    if exp.posttrain.replay > 0 and q == 0:
        fail("posttrain.replay", exp.posttrain.replay, "0 unless pretrain.tokens >= data.seq_len")


def check_schedule(name: str, optimizer: Optimizer, num_steps: int, tokens_per_step: int) -> None:
    """Refuses a warmup that spans the whole stage (its peak LR would never be reached,
    so the stage length would change the LR) unless the stage allows it."""
    warmup = optimizer.schedule(num_steps, tokens_per_step)["warmup_steps"]
    if 0 < num_steps <= warmup and not optimizer.allow_unreached_peak:
        key = "warmup_fraction" if optimizer.warmup_fraction > 0 else "warmup_steps"
        value = getattr(optimizer, key)
        fail(
            f"{name}.{key}",
            value,
            f"a warmup shorter than the stage's {num_steps} steps "
            f"(it is {warmup}); scale it with the stage ({name}.warmup_fraction) or set "
            f"{name}.allow_unreached_peak=True",
        )


# ----------------------------------------------------------------------------- sweeps


def assign(cfg: mlc.ConfigDict, path: str, value: Any) -> None:
    """Sets a dotted config path ("pretrain.exposure.lam") to `value`."""
    *head, last = path.split(".")
    node = cfg
    for key in head:
        node = node[key]
    node[last] = value


def replicates(cfg: mlc.ConfigDict) -> tuple[int, bool]:
    """(replicates, replicate_pools), validated."""
    root = _Section(cfg, "")
    return root.int("replicates", 1), root.bool("replicate_pools")


def replicate(cfg: mlc.ConfigDict, r: int) -> mlc.ConfigDict:
    """The config of replicate `r`: seed + r (initialisation, data order, exposed subset,
    dropout), posttrain.seed + r when set, and data.seed + r (another sample of every
    corpus, so other pools) when replicate_pools. Replicate 0 is the config itself."""
    c = mlc.ConfigDict(cfg.to_dict())
    if r == 0:
        return c
    c.seed += r
    if c.posttrain.seed != -1:
        c.posttrain.seed += r
    if c.replicate_pools:
        c.data.seed += r
    return c


def pin(cfg: mlc.ConfigDict, overrides: Mapping[str, Any]) -> tuple[mlc.ConfigDict, list[str]]:
    """The config with every overridden key that a sweep sets pinned to its given value:
    that sweep axis becomes the one value (and is validated like any other), and a line
    says so. An override of one key of a linked axis (keys that change together) is
    refused: pinning it alone would break the link. Other overrides pass unchanged."""
    out = mlc.ConfigDict(cfg.to_dict())
    notes = []
    for path, value in overrides.items():
        if path.startswith("sweep."):
            continue
        for name in STAGES:
            entries = list(out.sweep[name])
            for i, (paths, values) in enumerate(entries):
                linked = isinstance(paths, tuple | list)
                if linked and path in paths:
                    fail(
                        path,
                        value,
                        f"not a key of the linked sweep sweep.{name} ({', '.join(paths)}); "
                        f"override the whole entry with --config.sweep.{name}=...",
                    )
                if paths == path:
                    entries[i] = (path, (value,))
                    notes.append(
                        f"--config.{path}={value!r} replaces sweep.{name}'s values "
                        f"{tuple(values)} for {path}"
                    )
            out.sweep[name] = tuple(entries)
    return out, notes


def _has_path(cfg: mlc.ConfigDict, path: str) -> bool:
    node = cfg
    for key in path.split("."):
        if not isinstance(node, mlc.ConfigDict) or key not in node:
            return False
        node = node[key]
    return True


def check_sweep(cfg: mlc.ConfigDict) -> None:
    """Each stage's sweep sets only keys that exist and that the stage owns.

    A sweep entry is (path, values), or (tuple of paths, tuples of values) for keys that
    change together (a compute-matched arm and its schedule): the graph is the product
    over entries, not over linked paths."""
    if "sweep" not in cfg or set(cfg.sweep.keys()) != set(STAGES):
        fail(
            "sweep",
            sorted(cfg.sweep.keys()) if "sweep" in cfg else MISSING,
            f"exactly the sections {STAGES}",
        )
    for name in STAGES:
        pairs = cfg.sweep[name]
        if not isinstance(pairs, tuple | list) or not all(
            isinstance(p, tuple | list) and len(p) == 2 for p in pairs
        ):
            fail(f"sweep.{name}", pairs, "a tuple of (dotted config path, values) pairs")
        for path, values in pairs:
            linked = isinstance(path, tuple | list)
            for p in path if linked else (path,):
                if not isinstance(p, str) or not _has_path(cfg, p):
                    fail(f"sweep.{name}", p, "dotted paths of existing config keys")
                if p in SEED_PATHS:
                    fail(
                        f"sweep.{name}",
                        p,
                        "no seed: replicates=N runs the graph N times, replicate r at "
                        "seed + r (and data.seed + r with replicate_pools)",
                    )
                if not p.startswith(STAGE_KINDS[name].sweepable):
                    fail(f"sweep.{name}", p, f"paths under {STAGE_KINDS[name].sweepable}")
            key = f"sweep.{name}.{path if not linked else ','.join(path)}"
            if not isinstance(values, list | tuple) or not values:
                fail(key, values, "a non-empty list of values")
            if linked and not all(
                isinstance(v, tuple | list) and len(v) == len(path) for v in values
            ):
                fail(key, values, f"tuples of {len(path)} values, one per linked path")
