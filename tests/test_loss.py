"""Cross-entropy: the chunked LM-head loss equals the one-pass loss, value and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retention_jax import loss

B, L, D, V = 2, 32, 16, 40


def _inputs(seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed, impl="rbg"), 3)
    h_BxLxD = jax.random.normal(k1, (B, L, D))
    w_DxV = jax.random.normal(k2, (D, V)) * 0.5
    targets_BxL = jax.random.randint(k3, (B, L), 0, V)
    mask_BxL = jnp.arange(L)[None] < jnp.array([[L], [L // 2 + 3]])  # a padded tail
    return h_BxLxD, w_DxV, targets_BxL, mask_BxL


def _reference(h, w, t, m):
    """Plain autodiff through optax-style log-softmax: independent of both custom VJPs."""
    logp = jax.nn.log_softmax(h @ w, axis=-1)
    xent = -jnp.take_along_axis(logp, t[..., None], axis=-1)[..., 0]
    return (xent * m).sum(), m.sum().astype(jnp.float32)


@pytest.mark.parametrize("chunk", [0, 1, 8, 32])
def test_chunked_loss_and_gradients_match(chunk):
    h, w, t, m = _inputs()

    def ours(h, w):
        if chunk == 0:
            return loss.cross_entropy(h @ w, t, m)[0]
        return loss.head_cross_entropy(h, w, t, m, chunk)[0]

    value, (dh, dw) = jax.jit(jax.value_and_grad(ours, argnums=(0, 1)))(h, w)
    ref, (rh, rw) = jax.value_and_grad(lambda h, w: _reference(h, w, t, m)[0], (0, 1))(h, w)
    np.testing.assert_allclose(value, ref, rtol=1e-6)
    np.testing.assert_allclose(dh, rh, atol=1e-5)
    np.testing.assert_allclose(dw, rw, atol=1e-5)
    assert float(jnp.abs(dh[1, L // 2 + 3 :]).max()) == 0.0  # padding gets no gradient
    count = loss.head_cross_entropy(h, w, t, m, 8)[1]
    assert float(count) == L + L // 2 + 3


def test_chunk_must_divide_length():
    h, w, t, m = _inputs()
    with pytest.raises(ValueError, match=r"model.loss_chunk=5 is invalid; allowed: 0 .*32"):
        loss.head_cross_entropy(h, w, t, m, 5)


def test_chunked_loss_keeps_no_full_logits():
    """The compiled gradient's scratch memory holds one chunk of logits, not all B×L×V."""
    h, w, t, m = (jnp.zeros((4, 512, 64)), jnp.zeros((64, 4096)), None, None)
    t = jnp.zeros((4, 512), jnp.int32)
    m = jnp.ones((4, 512), bool)

    def temp(f):
        g = jax.jit(jax.grad(f, argnums=(0, 1)))
        return g.lower(h, w).compile().memory_analysis().temp_size_in_bytes

    full = temp(lambda h, w: loss.cross_entropy(h @ w, t, m)[0])
    chunked = temp(lambda h, w: loss.head_cross_entropy(h, w, t, m, 32)[0])
    logits_bytes = 4 * 512 * 4096 * 4
    assert full >= logits_bytes
    assert chunked < logits_bytes / 4
