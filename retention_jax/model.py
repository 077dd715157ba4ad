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

import dataclasses
import functools
import logging
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from retention_jax import config, sharding

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


def axis_sizes(cfg: config.Model) -> dict[str, int]:
    """Sizes of the logical axes that name parameter dimensions."""
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
        size = axis_sizes(cfg)
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
        targets = cfg.lora.targets if cfg.lora.rank > 0 else ()
        self.lora_targets = tuple(t for t in targets if t in _PROJ)  # "head" is the model's
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
        if cfg.lora.rank > 0 and "head" in cfg.lora.targets:
            a = cfg.init_std * jax.random.normal(rngs.params(), (cfg.d_model, cfg.lora.rank), dtype)
            self.head_lora_a = LoRAParam(a, out_sharding=("embed", "lora"))
            zeros = jnp.zeros((cfg.lora.rank, cfg.vocab_size), dtype)
            self.head_lora_b = LoRAParam(zeros, out_sharding=("lora", "vocab"))

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
        h_BxLxD = self.hidden(tokens_BxL, positions_BxL, segment_ids_BxL, dropout_key=dropout_key)
        return h_BxLxD @ self.head_weight()

    def hidden(
        self,
        tokens_BxL: jax.Array,
        positions_BxL: jax.Array,
        segment_ids_BxL: jax.Array,
        *,
        dropout_key: jax.Array | None = None,
    ) -> jax.Array:
        """Final-normed hidden states (compute dtype): the loss applies the head itself."""
        x_BxLxD = self.embed[...][tokens_BxL]
        return self.trunk(x_BxLxD, positions_BxL, segment_ids_BxL, dropout_key=dropout_key)

    def head_weight(self) -> jax.Array:
        """The LM head (embed, vocab) in the compute dtype (the embedding when tied), with
        its LoRA adapter as a weight delta (LoRA dropout applies to the layer targets)."""
        dtype = jnp.dtype(self.cfg.dtype)
        w_DxV = self.embed[...].T if self.cfg.tie_embeddings else self.head[...]
        if hasattr(self, "head_lora_a"):
            scale = self.cfg.lora.alpha / self.cfg.lora.rank
            w_DxV = w_DxV + scale * (self.head_lora_a[...] @ self.head_lora_b[...])
        return w_DxV.astype(dtype)

    def trunk(
        self,
        x_BxLxD: jax.Array,
        positions_BxL: jax.Array,
        segment_ids_BxL: jax.Array,
        *,
        dropout_key: jax.Array | None = None,
    ) -> jax.Array:
        """Input embeddings -> final-normed hidden states (embedding dropout included): the
        entry point for gradients with respect to the inputs, e.g. the causality test's."""
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        B, L, D = x_BxLxD.shape
        # Tokens are flattened (T = B*L): 2-D projections run ~1.5x faster on XLA:CPU.
        x_TxD = shard_rows(x_BxLxD.astype(dtype).reshape(B * L, D))
        if dropout_key is not None:
            x_TxD = _dropout(x_TxD, cfg.dropout.embed, jax.random.fold_in(dropout_key, 0))
            dropout_key = jax.random.fold_in(dropout_key, 1)

        impl = attention_impl(cfg, L)
        unroll = layer_unroll(cfg)
        _log_choice(cfg.scan_layers, unroll, impl, sharding.platform())
        cos_TxE, sin_TxE = _rope(positions_BxL.reshape(B * L), cfg.head_dim, cfg.rope_base)
        inputs = LayerInputs(
            _mask(impl, segment_ids_BxL), cos_TxE.astype(dtype), sin_TxE.astype(dtype)
        )

        block = _block_fn(cfg, impl, B, L)
        if cfg.remat != "none":
            block = jax.checkpoint(block, policy=_REMAT[cfg.remat])
        w = jax.tree.map(lambda a: a.astype(dtype), self.layers.weights())
        if cfg.scan_layers:

            def step(x, w_and_i):
                return block(*w_and_i, x, inputs, dropout_key), None

            x_TxD, _ = jax.lax.scan(step, x_TxD, (w, jnp.arange(cfg.n_layers)), unroll=unroll)
        else:
            for i in range(cfg.n_layers):
                w_i = jax.tree.map(lambda a, i=i: a[i], w)
                x_TxD = block(w_i, jnp.asarray(i), x_TxD, inputs, dropout_key)

        x_TxD = _rms_norm(x_TxD, self.final_norm[...], cfg.norm_eps)
        return shard_rows(x_TxD.reshape(B, L, D))


def shard_rows(x: jax.Array) -> jax.Array:
    """Pins an activation's leading (row or token) axis to the batch mesh axes.

    Without it, GSPMD may follow the fsdp-sharded weights and split activations along
    `embed` instead, replicating every row on every device (the 1B step on fsdp=8 then
    needs ~8x the temporary memory). Active when traced under `jax.set_mesh(mesh)`; a
    no-op without a mesh in context.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    rows = tuple(a for a in sharding.BATCH if a in mesh.axis_names)
    return jax.lax.with_sharding_constraint(x, P(rows, *([None] * (x.ndim - 1))))


def attention_impl(cfg: config.Model, seq_len: int) -> str:
    """The attention implementation `auto` stands for on the platform compiled for.

    CPU: the einsum path with its hand-written backward pass (head-major batched
    matmuls; faster than autodiff of it and than `jax.nn.dot_product_attention` on
    XLA:CPU, benchmarks/step.py). GPU: cuDNN flash attention in bf16 (it takes no fp32).
    TPU: the splash kernel when the length tiles into its 128-wide blocks.
    Attention-probability dropout needs an einsum path.
    """
    if cfg.attention != "auto":
        return cfg.attention
    backend = sharding.platform()
    if cfg.dropout.attn > 0:
        return "einsum_vjp"
    if backend == "gpu":
        return "cudnn" if cfg.dtype == "bfloat16" else "xla"
    if backend == "tpu" and seq_len % 128 == 0:
        return "splash"
    return "einsum_vjp" if backend == "cpu" else "xla"


def layer_unroll(cfg: config.Model) -> int:
    """Layers per iteration of the layer scan (`scan_unroll`; 0 = by backend).

    XLA:CPU runs a scan as a while loop that zero-fills, then copies in and out, a stacked
    buffer for every residual the backward pass keeps (~15% of a SmolLM2-135M step);
    unrolled, each layer's residuals are plain buffers. On accelerators the loop stays
    rolled (compile time, memory scheduling). Without `scan_layers` the Python loop is
    unrolled by construction.
    """
    if not cfg.scan_layers:
        return cfg.n_layers
    if cfg.scan_unroll:
        return min(cfg.scan_unroll, cfg.n_layers)
    return cfg.n_layers if sharding.platform() == "cpu" else 1


@functools.cache
def _log_choice(scan: bool, unroll: int, impl: str, backend: str) -> None:
    """Logs each resolved (layer loop, attention) choice once per process."""
    loop = f"scan, {unroll} layer(s) per iteration" if scan else "Python loop (unrolled)"
    logging.info("model on %s: layers as %s; attention %s", backend, loop, impl)


def _mask(impl: str, segment_ids_BxL: jax.Array):
    """What each implementation takes to keep attention causal and within a segment."""
    if impl in ("einsum", "einsum_vjp"):
        L = segment_ids_BxL.shape[1]
        causal_LxL = jnp.tril(jnp.ones((L, L), bool))
        same_BxLxL = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
        mask_Bx1x1xLxL = (same_BxLxL & causal_LxL[None])[:, None, None]
        # 0 where attended, the most negative float32 elsewhere: exp underflows to 0.
        return jnp.where(mask_Bx1x1xLxL, 0.0, jnp.finfo(jnp.float32).min)
    if impl in ("xla", "cudnn"):  # causality comes from is_causal
        return (segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :])[:, None]
    return segment_ids_BxL  # splash builds its mask from the ids


def _heads(q_BxLxHxE, k_BxLxKxE, v_BxLxKxE):
    """Head-major layouts: both attention matmuls become plain batched matmuls over
    (B, K) with no transpose of an LxL tensor; only q/k/v and the output move."""
    B, L, H, E = q_BxLxHxE.shape
    K = k_BxLxKxE.shape[2]
    q_BxKxGxLxE = (q_BxLxHxE * (E**-0.5)).reshape(B, L, K, H // K, E).transpose(0, 2, 3, 1, 4)
    return q_BxKxGxLxE, k_BxLxKxE.transpose(0, 2, 1, 3), v_BxLxKxE.transpose(0, 2, 1, 3)


def _unheads(a_BxKxGxLxE: jax.Array) -> jax.Array:
    B, K, G, L, E = a_BxKxGxLxE.shape
    return a_BxKxGxLxE.transpose(0, 3, 1, 2, 4).reshape(B, L, K * G, E)


def _probs(q_BxKxGxLxE, k_BxKxLxE, bias_Bx1x1xLxL):
    s_BxKxGxLxL = jnp.einsum(
        "BKGLE,BKME->BKGLM", q_BxKxGxLxE, k_BxKxLxE, preferred_element_type=jnp.float32
    )
    # An additive mask fuses into the softmax and needs no select in the backward pass.
    return jax.nn.softmax(s_BxKxGxLxL + bias_Bx1x1xLxL, axis=-1).astype(q_BxKxGxLxE.dtype)


def _einsum_attention(q_BxLxHxE, k_BxLxKxE, v_BxLxKxE, bias_Bx1x1xLxL, drop):
    """Reference attention, differentiated by JAX."""
    q_BxKxGxLxE, k_BxKxLxE, v_BxKxLxE = _heads(q_BxLxHxE, k_BxLxKxE, v_BxLxKxE)
    p_BxKxGxLxL = drop(_probs(q_BxKxGxLxE, k_BxKxLxE, bias_Bx1x1xLxL))
    return _unheads(jnp.einsum("BKGLM,BKME->BKGLE", p_BxKxGxLxL, v_BxKxLxE))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention_vjp(q_BxKxGxLxE, k_BxKxLxE, v_BxKxLxE, bias_Bx1x1xLxL, key, rate):
    """`_einsum_attention` on head-major, pre-scaled q, k, v with a hand-written backward
    pass; `key` draws the probability dropout mask at `rate` (None: no dropout)."""
    return _attention_vjp_fwd(q_BxKxGxLxE, k_BxKxLxE, v_BxKxLxE, bias_Bx1x1xLxL, key, rate)[0]


def _attention_vjp_fwd(q_BxKxGxLxE, k_BxKxLxE, v_BxKxLxE, bias_Bx1x1xLxL, key, rate):
    p_BxKxGxLxL = _probs(q_BxKxGxLxE, k_BxKxLxE, bias_Bx1x1xLxL)
    keep = None if key is None else jax.random.bernoulli(key, 1.0 - rate, p_BxKxGxLxL.shape)
    pd_BxKxGxLxL = p_BxKxGxLxL if keep is None else _kept(p_BxKxGxLxL, keep, rate)
    o_BxKxGxLxE = jnp.einsum("BKGLM,BKME->BKGLE", pd_BxKxGxLxL, v_BxKxLxE)
    res = (q_BxKxGxLxE, k_BxKxLxE, v_BxKxLxE, p_BxKxGxLxL, keep, o_BxKxGxLxE)
    return o_BxKxGxLxE, res


def _attention_vjp_bwd(rate, res, do_BxKxGxLxE):
    """Softmax backward as P * (dP - D) with D = rowsum(dO * O), a reduction over the
    head dimension (E) instead of the LxL one that autodiff of the softmax performs."""
    q_BxKxGxLxE, k_BxKxLxE, v_BxKxLxE, p_BxKxGxLxL, keep, o_BxKxGxLxE = res
    pd_BxKxGxLxL = p_BxKxGxLxL if keep is None else _kept(p_BxKxGxLxL, keep, rate)
    dv_BxKxLxE = jnp.einsum("BKGLM,BKGLE->BKME", pd_BxKxGxLxL, do_BxKxGxLxE)
    dp_BxKxGxLxL = jnp.einsum("BKGLE,BKME->BKGLM", do_BxKxGxLxE, v_BxKxLxE)
    if keep is not None:
        dp_BxKxGxLxL = _kept(dp_BxKxGxLxL, keep, rate)
    d_BxKxGxLx1 = (do_BxKxGxLxE * o_BxKxGxLxE).sum(-1, keepdims=True, dtype=jnp.float32)
    ds_BxKxGxLxL = (p_BxKxGxLxL * (dp_BxKxGxLxL - d_BxKxGxLx1)).astype(q_BxKxGxLxE.dtype)
    dq_BxKxGxLxE = jnp.einsum("BKGLM,BKME->BKGLE", ds_BxKxGxLxL, k_BxKxLxE)
    dk_BxKxLxE = jnp.einsum("BKGLM,BKGLE->BKME", ds_BxKxGxLxL, q_BxKxGxLxE)
    return dq_BxKxGxLxE, dk_BxKxLxE, dv_BxKxLxE, None, None


_attention_vjp.defvjp(_attention_vjp_fwd, _attention_vjp_bwd)


def _kept(x: jax.Array, keep: jax.Array, rate: float) -> jax.Array:
    """Inverted dropout with a given keep mask (`_dropout` draws the same mask)."""
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def _splash_attention(q_BxLxHxE, k_BxLxKxE, v_BxLxKxE, segment_ids_BxL):
    """TPU Pallas splash attention (causal, segment ids), vmapped over rows.

    Under a mesh the kernel runs per shard (shard_map: rows over data×fsdp, heads over
    tensor), since a Pallas call cannot be partitioned automatically. Off TPU the kernel
    runs in the Pallas interpreter: slow, but it lets a CPU test check the numerics.
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    B, L, H, E = q_BxLxHxE.shape
    mesh = jax.sharding.get_abstract_mesh()
    axes = () if mesh.empty else tuple(mesh.axis_names)
    tensor = mesh.shape["tensor"] if "tensor" in axes else 1
    local_heads = H // tensor
    mask = splash.MultiHeadMask([splash.CausalMask((L, L))] * local_heads)
    kernel = splash.make_splash_mha(
        mask=mask, head_shards=1, q_seq_shards=1, interpret=sharding.platform() != "tpu"
    )

    def run(q, k, v, seg):  # (b, L, h, E) per shard; the kernel takes heads first
        heads_first = lambda a: a.transpose(0, 2, 1, 3)
        out = jax.vmap(
            lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=splash.SegmentIds(q=s1, kv=s1))
        )(heads_first(q * (E**-0.5)), heads_first(k), heads_first(v), seg)
        return out.transpose(0, 2, 1, 3)

    if not axes:
        return run(q_BxLxHxE, k_BxLxKxE, v_BxLxKxE, segment_ids_BxL)
    rows = tuple(a for a in ("data", "fsdp") if a in axes) or None
    heads = "tensor" if "tensor" in axes else None
    qkv = P(rows, None, heads, None)
    return jax.shard_map(
        run, mesh=mesh, in_specs=(qkv, qkv, qkv, P(rows, None)), out_specs=qkv, check_vma=False
    )(q_BxLxHxE, k_BxLxKxE, v_BxLxKxE, segment_ids_BxL)


class LayerInputs(NamedTuple):
    """What every layer reads besides its weights and the residual stream."""

    mask: jax.Array  # the attention mask in the form the implementation takes
    cos_TxE: jax.Array
    sin_TxE: jax.Array


def _block_fn(cfg: config.Model, impl: str, B: int, L: int) -> Callable:
    """One pre-norm decoder layer as a pure function of that layer's weights."""
    rate = cfg.dropout
    lora_scale = cfg.lora.alpha / max(cfg.lora.rank, 1)
    H, K, E = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim

    def block(w, i, x_TxD, inputs: LayerInputs, key):
        mask, cos_TxE, sin_TxE = inputs
        key = None if key is None else jax.random.fold_in(key, i)

        def drop(y, p, site):
            return y if key is None else _dropout(y, p, jax.random.fold_in(key, site))

        def lora(name, y, out):
            if f"{name}_lora_a" not in w:
                return out
            y = drop(y, cfg.lora.dropout, 16 + list(_PROJ).index(name))
            h = jnp.tensordot(y, w[f"{name}_lora_a"], axes=len(_PROJ[name][0]))
            return out + lora_scale * jnp.tensordot(h, w[f"{name}_lora_b"], axes=1)

        def proj(name, y):
            return lora(name, y, jnp.tensordot(y, w[name], axes=len(_PROJ[name][0])))

        h_TxD = _rms_norm(x_TxD, w["attn_norm"], cfg.norm_eps)
        q_BxLxHxE = _apply_rope(proj("q", h_TxD), cos_TxE, sin_TxE).reshape(B, L, H, E)
        k_BxLxKxE = _apply_rope(proj("k", h_TxD), cos_TxE, sin_TxE).reshape(B, L, K, E)
        v_BxLxKxE = proj("v", h_TxD).reshape(B, L, K, E)
        if impl == "einsum":
            attn = lambda p: drop(p, rate.attn, _ATTN)
            a_BxLxHxE = _einsum_attention(q_BxLxHxE, k_BxLxKxE, v_BxLxKxE, mask, attn)
        elif impl == "einsum_vjp":
            attn_key = None if key is None or rate.attn == 0 else jax.random.fold_in(key, _ATTN)
            heads = _heads(q_BxLxHxE, k_BxLxKxE, v_BxLxKxE)
            a_BxLxHxE = _unheads(_attention_vjp(*heads, mask, attn_key, rate.attn))
        elif impl == "splash":
            a_BxLxHxE = _splash_attention(q_BxLxHxE, k_BxLxKxE, v_BxLxKxE, mask)
        else:
            a_BxLxHxE = jax.nn.dot_product_attention(
                q_BxLxHxE, k_BxLxKxE, v_BxLxKxE, mask=mask, is_causal=True, implementation=impl
            )
        a_TxD = proj("o", a_BxLxHxE.reshape(B * L, H, E))
        x_TxD = x_TxD + drop(a_TxD, rate.resid, _RESID_ATTN)

        h_TxD = _rms_norm(x_TxD, w["mlp_norm"], cfg.norm_eps)
        f_TxF = drop(_swiglu(proj("gate", h_TxD), proj("up", h_TxD)), rate.mlp, _MLP)
        return shard_rows(x_TxD + drop(proj("down", f_TxF), rate.resid, _RESID_MLP))

    return block


@jax.custom_vjp
def _swiglu(gate_TxF: jax.Array, up_TxF: jax.Array) -> jax.Array:
    """silu(gate) * up with a one-pass backward: autodiff of silu leaves XLA:CPU several
    separate elementwise passes over the (T, F) activations."""
    return gate_TxF * jax.nn.sigmoid(gate_TxF) * up_TxF


def _swiglu_fwd(gate_TxF, up_TxF):
    return _swiglu(gate_TxF, up_TxF), (gate_TxF, up_TxF)


def _swiglu_bwd(res, dy_TxF):
    gate_TxF, up_TxF = res
    sig_TxF = jax.nn.sigmoid(gate_TxF)
    silu_TxF = gate_TxF * sig_TxF
    dgate_TxF = dy_TxF * up_TxF * (sig_TxF + silu_TxF * (1.0 - sig_TxF))
    return dgate_TxF, dy_TxF * silu_TxF


_swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


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
    return _kept(x, jax.random.bernoulli(key, 1.0 - rate, x.shape), rate)


def merge_lora(params: dict, cfg: config.Model) -> tuple[dict, config.Model]:
    """Adapters folded into their weights (W + alpha/rank · A @ B), and the model without
    them. A head adapter on tied embeddings unties the head (the embedding stays as it
    was): the merged model computes the same function. `params` is a pure dict."""
    if cfg.lora.rank == 0:
        return params, cfg
    scale = cfg.lora.alpha / cfg.lora.rank
    out = {k: v for k, v in params.items() if not k.startswith("head_lora")}
    layers = dict(params["layers"])
    for t in cfg.lora.targets:
        if t == "head":
            continue
        a, b = layers.pop(f"{t}_lora_a"), layers.pop(f"{t}_lora_b")
        delta = jax.vmap(lambda a, b: jnp.tensordot(a, b, axes=1))(a, b)
        layers[t] = layers[t] + scale * delta.astype(layers[t].dtype)
    out["layers"] = layers
    merged = dataclasses.replace(cfg, lora=config.Lora(0, cfg.lora.alpha, 0.0, ()))
    if "head" in cfg.lora.targets:
        head = params["embed"].T if cfg.tie_embeddings else params["head"]
        out["head"] = head + scale * (params["head_lora_a"] @ params["head_lora_b"])
        merged = dataclasses.replace(merged, tie_embeddings=False)
    return out, merged


def count_params(cfg: config.Model) -> int:
    """Base (non-LoRA) parameters, from shapes only: nothing is allocated."""
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, BASE_PARAMS)))


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


def put_pure(shapes: nnx.State, pure: dict) -> nnx.State:
    """`shapes` (ShapeDtypeStructs with shardings, as `abstract_state` gives) filled from
    the pure dict `pure` (`nnx.to_pure_dict`'s layout: host or device arrays) and put on
    device in those shardings.

    Parameters from elsewhere (a Hugging Face checkpoint, merged LoRA weights) enter a
    stage this way; `nnx.replace_by_pure_dict` fills a state in place, so a copy of
    `shapes` is filled. Leaves `pure` lacks stay ShapeDtypeStructs for the caller to
    fill (the LoRA adapters of a base checkpoint)."""
    state = jax.tree.map(lambda a: a, shapes)
    nnx.replace_by_pure_dict(state, pure)
    return jax.tree.map(
        lambda a, s: a if isinstance(a, jax.ShapeDtypeStruct) else jax.device_put(a, s.sharding),
        state,
        shapes,
    )
