"""SmolLM2/Llama decoder in Flax NNX: RMSNorm, rotate-half RoPE, GQA, SwiGLU.

Layer weights are stacked along a leading "layers" axis, so the parameter tree is the
same whether the forward scans over layers or loops over them (checkpoints and sharding
rules do not depend on `scan_layers`). The block is a pure function of one layer's
arrays; dropout is explicit (a key argument), so the model state holds parameters only.

Parameter tree (`nnx.state(model)` paths):
  embed (vocab, embed)
  layers/attn_norm, layers/mlp_norm (layers, embed)
  layers/q (layers, embed, heads, head_dim); layers/k, layers/v (layers, embed, kv_heads, head_dim)
  layers/o (layers, heads, head_dim, embed)
  layers/gate, layers/up (layers, embed, mlp); layers/down (layers, mlp, embed)
  final_norm (embed,); head (embed, vocab) only when embeddings are untied
  layers/{t}_lora_a (layers, *in, lora), layers/{t}_lora_b (layers, lora, *out) for LoRA targets t

Shape letters: B batch, L length, T = B*L tokens, D d_model, H heads, K kv heads,
G = H/K query heads per kv head, E head_dim, F d_mlp, V vocab.
"""

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from retention_jax import config

LoRAParam = nnx.LoRAParam  # a Param subclass: `nnx.LoRAParam` selects the adapters only
BASE_PARAMS = nnx.All(nnx.Param, nnx.Not(LoRAParam))

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

# Projection name -> (logical input axes, logical output axes). Inputs contract with the
# activation's trailing axes, so every projection is one `tensordot`.
_PROJ = {
    "q": (("embed",), ("heads", "head_dim")),
    "k": (("embed",), ("kv_heads", "head_dim")),
    "v": (("embed",), ("kv_heads", "head_dim")),
    "o": (("heads", "head_dim"), ("embed",)),
    "gate": (("embed",), ("mlp",)),
    "up": (("embed",), ("mlp",)),
    "down": (("mlp",), ("embed",)),
}
# fold_in ids of the dropout sites inside a layer; LoRA targets use 16 + their index.
_ATTN, _RESID_ATTN, _RESID_MLP, _MLP = range(4)
_REMAT = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep projections
}


def _axis_sizes(cfg: config.Model) -> dict[str, int]:
    return dict(
        vocab=cfg.vocab_size,
        embed=cfg.d_model,
        heads=cfg.n_heads,
        kv_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        mlp=cfg.d_mlp,
        layers=cfg.n_layers,
        lora=cfg.lora.rank,
    )


class Layers(nnx.Module):
    """All decoder layers' weights, each stacked along a leading layer axis."""

    def __init__(self, cfg: config.Model, *, rngs: nnx.Rngs):
        size = _axis_sizes(cfg)
        dtype = jnp.dtype(cfg.param_dtype)

        def param(kind, axes, init="normal"):
            shape = tuple(size[a] for a in axes)
            if init == "ones":
                value = jnp.ones(shape, dtype)
            elif init == "zeros":
                value = jnp.zeros(shape, dtype)
            else:
                value = cfg.init_std * jax.random.normal(rngs.params(), shape, dtype)
            return kind(value, out_sharding=axes)

        self.attn_norm = param(nnx.Param, ("layers", "embed"), "ones")
        self.mlp_norm = param(nnx.Param, ("layers", "embed"), "ones")
        for name, (ins, outs) in _PROJ.items():
            setattr(self, name, param(nnx.Param, ("layers", *ins, *outs)))
        self.lora_targets = tuple(cfg.lora.targets) if cfg.lora.rank > 0 else ()
        for name in self.lora_targets:
            ins, outs = _PROJ[name]
            setattr(self, f"{name}_lora_a", param(LoRAParam, ("layers", *ins, "lora")))
            setattr(self, f"{name}_lora_b", param(LoRAParam, ("layers", "lora", *outs), "zeros"))

    def weights(self) -> dict[str, jax.Array]:
        names = ["attn_norm", "mlp_norm", *_PROJ]
        names += [f"{t}_lora_{ab}" for t in self.lora_targets for ab in "ab"]
        return {n: getattr(self, n)[...] for n in names}


class Transformer(nnx.Module):
    """Decoder-only LM configured by a typed `config.Model` (presets in `presets.py`)."""

    def __init__(self, cfg: config.Model, *, rngs: nnx.Rngs):
        """`cfg` comes validated from `config.parse_model` (shapes, dtypes, remat, LoRA)."""
        self.cfg = cfg  # a frozen dataclass: hashable, part of the static graphdef
        dtype = jnp.dtype(cfg.param_dtype)
        self.embed = nnx.Param(
            cfg.init_std * jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.d_model), dtype),
            out_sharding=("vocab", "embed"),
        )
        self.layers = Layers(cfg, rngs=rngs)
        self.final_norm = nnx.Param(jnp.ones((cfg.d_model,), dtype), out_sharding=("embed",))
        if not cfg.tie_embeddings:
            self.head = nnx.Param(
                cfg.init_std
                * jax.random.normal(rngs.params(), (cfg.d_model, cfg.vocab_size), dtype),
                out_sharding=("embed", "vocab"),
            )

    def __call__(
        self,
        tokens_BxL: jax.Array,
        positions_BxL: jax.Array,
        segment_ids_BxL: jax.Array,
        *,
        dropout_key: jax.Array | None = None,
    ) -> jax.Array:
        """Logits in the compute dtype (cast to float32 for the loss).

        Attention is causal by index within a row and restricted to equal segment ids, so
        packed documents never see each other (padding, id 0, only sees padding).
        `positions_BxL` only drives RoPE. `dropout_key=None` is deterministic. Any key
        implementation works; RBG keys (`jax.random.key(s, impl="rbg")`) compile several
        times faster than threefry on CPU when dropout is on.
        """
        x_BxLxD = self.embed[...][tokens_BxL]
        return self.decode(x_BxLxD, positions_BxL, segment_ids_BxL, dropout_key=dropout_key)

    def decode(
        self,
        x_BxLxD: jax.Array,
        positions_BxL: jax.Array,
        segment_ids_BxL: jax.Array,
        *,
        dropout_key: jax.Array | None = None,
    ) -> jax.Array:
        """The model from input embeddings on (embedding dropout included): gradients
        with respect to the inputs, e.g. the causality test, need this entry point."""
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        B, L, D = x_BxLxD.shape
        # Tokens are flattened (T = B*L): 2-D projections run ~1.5x faster on XLA:CPU.
        x_TxD = x_BxLxD.astype(dtype).reshape(B * L, D)
        if dropout_key is not None:
            x_TxD = _dropout(x_TxD, cfg.dropout.embed, jax.random.fold_in(dropout_key, 0))
            dropout_key = jax.random.fold_in(dropout_key, 1)

        causal_LxL = jnp.tril(jnp.ones((L, L), bool))
        same_BxLxL = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
        mask_Bx1x1xLxL = (same_BxLxL & causal_LxL[None])[:, None, None]
        # 0 where attended, the most negative float32 elsewhere: exp underflows to 0.
        bias_Bx1x1xLxL = jnp.where(mask_Bx1x1xLxL, 0.0, jnp.finfo(jnp.float32).min)
        cos_TxE, sin_TxE = _rope(positions_BxL.reshape(B * L), cfg.head_dim, cfg.rope_base)
        ctx = (bias_Bx1x1xLxL, cos_TxE.astype(dtype), sin_TxE.astype(dtype))

        block = _block_fn(cfg)
        if cfg.remat != "none":
            block = jax.checkpoint(block, policy=_REMAT[cfg.remat])
        w = jax.tree.map(lambda a: a.astype(dtype), self.layers.weights())
        if cfg.scan_layers:

            def step(x, w_and_i):
                return block(*w_and_i, x, ctx, dropout_key), None

            # XLA:CPU runs a scan as a while loop that zero-fills, then copies in and out,
            # a stacked buffer for every residual the backward pass keeps (~15% of a
            # SmolLM2-135M step); unrolled, each layer's residuals are plain buffers. On
            # accelerators the loop stays rolled (compile time, memory scheduling).
            unroll = cfg.n_layers if jax.default_backend() == "cpu" else 1
            x_TxD, _ = jax.lax.scan(step, x_TxD, (w, jnp.arange(cfg.n_layers)), unroll=unroll)
        else:
            for i in range(cfg.n_layers):
                w_i = jax.tree.map(lambda a, i=i: a[i], w)
                x_TxD = block(w_i, jnp.asarray(i), x_TxD, ctx, dropout_key)

        x_TxD = _rms_norm(x_TxD, self.final_norm[...], cfg.norm_eps)
        if cfg.tie_embeddings:
            logits_TxV = x_TxD @ self.embed[...].astype(dtype).T
        else:
            logits_TxV = x_TxD @ self.head[...].astype(dtype)
        return logits_TxV.reshape(B, L, -1)


def _block_fn(cfg: config.Model) -> Callable:
    """One pre-norm decoder layer as a pure function of that layer's weights."""
    rate = cfg.dropout
    lora_scale = cfg.lora.alpha / max(cfg.lora.rank, 1)
    H, K, E = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    G = H // K

    def block(w, i, x_TxD, ctx, key):
        bias_Bx1x1xLxL, cos_TxE, sin_TxE = ctx
        B, L = bias_Bx1x1xLxL.shape[0], bias_Bx1x1xLxL.shape[-1]
        key = None if key is None else jax.random.fold_in(key, i)

        def drop(y, p, site):
            return y if key is None else _dropout(y, p, jax.random.fold_in(key, site))

        def proj(name, y):
            out = jnp.tensordot(y, w[name], axes=len(_PROJ[name][0]))
            if f"{name}_lora_a" in w:
                y = drop(y, cfg.lora.dropout, 16 + list(_PROJ).index(name))
                h = jnp.tensordot(y, w[f"{name}_lora_a"], axes=len(_PROJ[name][0]))
                out = out + lora_scale * jnp.tensordot(h, w[f"{name}_lora_b"], axes=1)
            return out

        h_TxD = _rms_norm(x_TxD, w["attn_norm"], cfg.norm_eps)
        q_TxHxE = _apply_rope(proj("q", h_TxD), cos_TxE, sin_TxE) * (E**-0.5)
        k_TxKxE = _apply_rope(proj("k", h_TxD), cos_TxE, sin_TxE)
        # Head-major layouts make both attention matmuls plain batched matmuls over (B, K)
        # with no transpose of an LxL tensor: only the small q/k/v/output tensors move.
        q_BxKxGxLxE = q_TxHxE.reshape(B, L, K, G, E).transpose(0, 2, 3, 1, 4)
        k_BxKxLxE = k_TxKxE.reshape(B, L, K, E).transpose(0, 2, 1, 3)
        v_BxKxLxE = proj("v", h_TxD).reshape(B, L, K, E).transpose(0, 2, 1, 3)
        s_BxKxGxLxL = jnp.einsum(
            "BKGLE,BKME->BKGLM", q_BxKxGxLxE, k_BxKxLxE, preferred_element_type=jnp.float32
        )
        # An additive mask fuses into the softmax and needs no select in the backward pass.
        p_BxKxGxLxL = jax.nn.softmax(s_BxKxGxLxL + bias_Bx1x1xLxL, axis=-1).astype(x_TxD.dtype)
        p_BxKxGxLxL = drop(p_BxKxGxLxL, rate.attn, _ATTN)
        a_BxKxGxLxE = jnp.einsum("BKGLM,BKME->BKGLE", p_BxKxGxLxL, v_BxKxLxE)
        a_BxLxKxGxE = a_BxKxGxLxE.transpose(0, 3, 1, 2, 4)
        a_TxD = proj("o", a_BxLxKxGxE.reshape(B * L, H, E))
        x_TxD = x_TxD + drop(a_TxD, rate.resid, _RESID_ATTN)

        h_TxD = _rms_norm(x_TxD, w["mlp_norm"], cfg.norm_eps)
        f_TxF = drop(jax.nn.silu(proj("gate", h_TxD)) * proj("up", h_TxD), rate.mlp, _MLP)
        return x_TxD + drop(proj("down", f_TxF), rate.resid, _RESID_MLP)

    return block


def _rms_norm(x_TxD: jax.Array, w_D: jax.Array, eps: float) -> jax.Array:
    """RMSNorm in float32 (as HF Llama does), result in the input dtype."""
    x32 = x_TxD.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (w_D.astype(jnp.float32)[None] * x32).astype(x_TxD.dtype)


def _rope(positions_T: jax.Array, head_dim: int, base: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape (T, head_dim) in float32, halves repeated (HF layout)."""
    inv_freq_E2 = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angle_TxE2 = positions_T.astype(jnp.float32)[:, None] * inv_freq_E2[None]
    angle_TxE = jnp.concatenate([angle_TxE2, angle_TxE2], axis=-1)
    return jnp.cos(angle_TxE), jnp.sin(angle_TxE)


def _apply_rope(x_TxHxE: jax.Array, cos_TxE: jax.Array, sin_TxE: jax.Array) -> jax.Array:
    """HF Llama rotate-half: x*cos + [-x2, x1]*sin."""
    x1, x2 = jnp.split(x_TxHxE, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x_TxHxE * cos_TxE[:, None] + rotated * sin_TxE[:, None]


def _dropout(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    """Inverted dropout; a no-op at rate 0 (rates are static config values)."""
    if rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def count_params(cfg: config.Model) -> int:
    """Base (non-LoRA) parameters, from shapes only: nothing is allocated."""
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, BASE_PARAMS)))


def flops_per_token(cfg: config.Model, seq_len: int) -> float:
    """Training FLOPs per token: 6*N_matmul + 6*n_layers*seq_len*(n_heads*head_dim).

    MaxText convention: forward+backward = 3x forward, 2 FLOPs per multiply-add, and
    causal attention counted at half of the full QK^T and PV matmuls (Levanter counts
    full attention, 12*L*s*d). N_matmul = per-layer projections plus the LM head (the
    tied embedding is counted once, as the head); norms and the embedding gather are not
    matmuls. LoRA adapters are ignored.
    """
    d, h, kv, hd, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_mlp
    per_layer = d * hd * (2 * h + 2 * kv) + 3 * d * f
    n_matmul = cfg.n_layers * per_layer + d * cfg.vocab_size
    return 6.0 * n_matmul + 6.0 * cfg.n_layers * seq_len * h * hd


def create(cfg: config.Model, mesh: Mesh, rules: Rules, seed: int) -> Transformer:
    """A model with each parameter initialised directly in its sharding (jitted init)."""
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        return nnx.jit(lambda: Transformer(cfg, rngs=nnx.Rngs(params=seed)))()


def abstract_state(cfg: config.Model, mesh: Mesh, rules: Rules) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, state of ShapeDtypeStruct with NamedSharding(mesh, spec)), no allocation.

    The shardings refer to the concrete `mesh` (Orbax rejects eval_shape's abstract mesh).
    """
    with nnx.logical_axis_rules(rules):
        graphdef, state = nnx.get_abstract_model(lambda: Transformer(cfg, rngs=nnx.Rngs(0)), mesh)
    return graphdef, jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(
            a.shape, a.dtype, sharding=NamedSharding(mesh, a.sharding.spec)
        ),
        state,
    )
