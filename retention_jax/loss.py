"""Next-token cross-entropy: from logits in one pass, or from hidden states in chunks.

Both have a hand-written backward pass. Autodiff of `take_along_axis` adds a scatter (a
serial loop on XLA:CPU) and extra passes over the B×L×V logits; softmax minus one-hot is
one elementwise pass. The chunked form also moves the LM-head matmul inside a scan over
position chunks, so the float32 logits of the whole batch never exist at once: only one
(B, chunk, V) block does, in the forward and again in the backward pass.
"""

import functools

import jax
import jax.numpy as jnp


@jax.custom_vjp
def _xent(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
    """Per-token cross-entropy, log-sum-exp minus the target's logit (float32 logits)."""
    return _xent_fwd(logits_BxLxV, targets_BxL)[0]


def _lse_and_target(logits_BxLxV, targets_BxL):
    max_BxL = logits_BxLxV.max(axis=-1)
    lse_BxL = jnp.log(jnp.exp(logits_BxLxV - max_BxL[..., None]).sum(axis=-1)) + max_BxL
    target_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
    return lse_BxL, target_BxL


def _dlogits(logits_BxLxV, lse_BxL, targets_BxL, g_BxL):
    """g * (softmax - one_hot) in one elementwise pass over the logits."""
    vocab_V = jnp.arange(logits_BxLxV.shape[-1], dtype=targets_BxL.dtype)
    hit_BxLxV = vocab_V[None, None] == targets_BxL[..., None]
    p_BxLxV = jnp.exp(logits_BxLxV - lse_BxL[..., None])
    return g_BxL[..., None] * (p_BxLxV - hit_BxLxV.astype(jnp.float32))


def _xent_fwd(logits_BxLxV, targets_BxL):
    lse_BxL, target_BxL = _lse_and_target(logits_BxLxV, targets_BxL)
    return lse_BxL - target_BxL, (logits_BxLxV, lse_BxL, targets_BxL)


def _xent_bwd(res, g_BxL):
    logits_BxLxV, lse_BxL, targets_BxL = res
    return _dlogits(logits_BxLxV, lse_BxL, targets_BxL, g_BxL), None


_xent.defvjp(_xent_fwd, _xent_bwd)


def cross_entropy(
    logits_BxLxV: jax.Array, targets_BxL: jax.Array, mask_BxL: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Summed next-token cross-entropy over real target tokens, and their count."""
    xent_BxL = _xent(logits_BxLxV.astype(jnp.float32), targets_BxL)
    w_BxL = mask_BxL.astype(jnp.float32)
    return (xent_BxL * w_BxL).sum(), w_BxL.sum()


def _chunks(a_BxL: jax.Array, chunk: int) -> jax.Array:
    """(B, L, ...) -> (L/chunk, B, chunk, ...): every chunk keeps all rows, so a batch
    sharded over rows stays sharded inside the scan."""
    B, L = a_BxL.shape[:2]
    return a_BxL.reshape(B, L // chunk, chunk, *a_BxL.shape[2:]).swapaxes(0, 1)


def _unchunk(a_NxBxC: jax.Array) -> jax.Array:
    a_BxNxC = a_NxBxC.swapaxes(0, 1)
    N, C = a_BxNxC.shape[1:3]
    return a_BxNxC.reshape(a_BxNxC.shape[0], N * C, *a_BxNxC.shape[3:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _head_xent(h_BxLxD, w_DxV, targets_BxL, chunk):
    return _head_xent_fwd(h_BxLxD, w_DxV, targets_BxL, chunk)[0]


def _head_xent_fwd(h_BxLxD, w_DxV, targets_BxL, chunk):
    def body(_, xs):
        h_BxCxD, t_BxC = xs
        logits_BxCxV = jnp.dot(h_BxCxD, w_DxV, preferred_element_type=jnp.float32)
        return None, _lse_and_target(logits_BxCxV, t_BxC)

    _, (lse, target) = jax.lax.scan(
        body, None, (_chunks(h_BxLxD, chunk), _chunks(targets_BxL, chunk))
    )
    lse_BxL = _unchunk(lse)
    return lse_BxL - _unchunk(target), (h_BxLxD, w_DxV, targets_BxL, lse_BxL)


def _head_xent_bwd(chunk, res, g_BxL):
    h_BxLxD, w_DxV, targets_BxL, lse_BxL = res

    def body(dw_DxV, xs):
        h_BxCxD, t_BxC, lse_BxC, g_BxC = xs
        logits_BxCxV = jnp.dot(h_BxCxD, w_DxV, preferred_element_type=jnp.float32)
        d_BxCxV = _dlogits(logits_BxCxV, lse_BxC, t_BxC, g_BxC).astype(h_BxCxD.dtype)
        dh_BxCxD = jnp.dot(d_BxCxV, w_DxV.T, preferred_element_type=jnp.float32)
        dw_DxV = dw_DxV + jnp.einsum(
            "BCD,BCV->DV", h_BxCxD, d_BxCxV, preferred_element_type=jnp.float32
        )
        return dw_DxV, dh_BxCxD.astype(h_BxCxD.dtype)

    xs = tuple(_chunks(a, chunk) for a in (h_BxLxD, targets_BxL, lse_BxL, g_BxL))
    dw_DxV, dh = jax.lax.scan(body, jnp.zeros(w_DxV.shape, jnp.float32), xs)
    return _unchunk(dh), dw_DxV.astype(w_DxV.dtype), None


_head_xent.defvjp(_head_xent_fwd, _head_xent_bwd)


def head_cross_entropy(
    h_BxLxD: jax.Array,
    w_DxV: jax.Array,
    targets_BxL: jax.Array,
    mask_BxL: jax.Array,
    chunk: int,
) -> tuple[jax.Array, jax.Array]:
    """`cross_entropy(h @ w, ...)` computed `chunk` positions of every row at a time."""
    L = h_BxLxD.shape[1]
    if chunk < 1 or L % chunk:
        raise ValueError(
            f"config key model.loss_chunk={chunk!r} is invalid; allowed: 0 (one pass) or "
            f"a divisor of the sequence length {L}"
        )
    xent_BxL = _head_xent(h_BxLxD, w_DxV, targets_BxL, chunk)
    w_BxL = mask_BxL.astype(jnp.float32)
    return (xent_BxL * w_BxL).sum(), w_BxL.sum()
