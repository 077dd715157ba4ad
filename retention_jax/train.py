"""The pure train and eval steps shared by all three stages, and their optimizer.

A stage differs from another only in data, starting parameters and the scalar
hyperparameters in `TrainState.hp` (peak and minimum LR, warmup, length, weight decay).
Those scalars are traced, not baked into the program, so every stage with the same
model, mesh and batch shape runs one compiled executable: the whole experiment graph
compiles its train step once per shape rather than once per node.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

HPARAMS = ("lr", "min_lr", "warmup_steps", "total_steps", "weight_decay")


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: steps taken in this stage
    params: nnx.State
    opt: optax.OptState
    hp: dict[str, jax.Array]  # float32 scalars named by HPARAMS


def learning_rate(step: jax.Array, hp: dict[str, jax.Array]) -> jax.Array:
    """Linear warmup to `lr`, then cosine decay to `min_lr` at `total_steps`."""
    step = step.astype(jnp.float32)
    warm = hp["lr"] * jnp.minimum(1.0, (step + 1.0) / jnp.maximum(hp["warmup_steps"], 1.0))
    span = jnp.maximum(hp["total_steps"] - hp["warmup_steps"], 1.0)
    progress = jnp.clip((step - hp["warmup_steps"]) / span, 0.0, 1.0)
    cosine = hp["min_lr"] + 0.5 * (hp["lr"] - hp["min_lr"]) * (1.0 + jnp.cos(jnp.pi * progress))
    return jnp.where(step < hp["warmup_steps"], warm, cosine)


def hparams(schedule: dict) -> dict[str, jax.Array]:
    """A resolved schedule (`config.Optimizer.schedule`) as the traced scalars of HPARAMS."""
    return {k: jnp.asarray(schedule[k], jnp.float32) for k in HPARAMS}


def decays(path: tuple, exclude: tuple[str, ...]) -> bool:
    """Weight decay applies to every parameter whose path names none of `exclude`."""
    name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
    return not any(word in name for word in exclude)


def make_tx(static: dict) -> optax.GradientTransformation:
    """Clipping and Adam moments; decay and the LR are applied in the step from `hp`."""
    return optax.chain(
        optax.clip_by_global_norm(static["clip_norm"]),
        optax.scale_by_adam(b1=static["b1"], b2=static["b2"], eps=static["eps"]),
    )


@jax.custom_vjp
def _xent(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
    """Per-token cross-entropy, log-sum-exp minus the target's logit (float32 logits)."""
    return _xent_fwd(logits_BxLxV, targets_BxL)[0]


def _xent_fwd(logits_BxLxV, targets_BxL):
    max_BxL = logits_BxLxV.max(axis=-1)
    lse_BxL = jnp.log(jnp.exp(logits_BxLxV - max_BxL[..., None]).sum(axis=-1)) + max_BxL
    target_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
    return lse_BxL - target_BxL, (logits_BxLxV, lse_BxL, targets_BxL)


def _xent_bwd(res, g_BxL):
    """softmax - one_hot in one elementwise pass over the logits: autodiff would add a
    scatter for the gather (a serial loop on XLA:CPU) and extra passes over B×L×V."""
    logits_BxLxV, lse_BxL, targets_BxL = res
    vocab_V = jnp.arange(logits_BxLxV.shape[-1], dtype=targets_BxL.dtype)
    hit_BxLxV = vocab_V[None, None] == targets_BxL[..., None]
    p_BxLxV = jnp.exp(logits_BxLxV - lse_BxL[..., None])
    dlogits_BxLxV = g_BxL[..., None] * (p_BxLxV - hit_BxLxV.astype(jnp.float32))
    return dlogits_BxLxV, None


_xent.defvjp(_xent_fwd, _xent_bwd)


def cross_entropy(
    logits_BxLxV: jax.Array, targets_BxL: jax.Array, mask_BxL: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Summed next-token cross-entropy over real target tokens, and their count."""
    xent_BxL = _xent(logits_BxLxV.astype(jnp.float32), targets_BxL)
    w_BxL = mask_BxL.astype(jnp.float32)
    return (xent_BxL * w_BxL).sum(), w_BxL.sum()


def _forward(graphdef, params, batch, dropout_key=None):
    model = nnx.merge(graphdef, params)
    logits_BxLxV = model(
        batch["inputs"], batch["positions"], batch["segment_ids"], dropout_key=dropout_key
    )
    return cross_entropy(logits_BxLxV, batch["targets"], batch["segment_ids"] > 0)


def train_step(
    graphdef: nnx.GraphDef,
    static: dict,
    state: TrainState,
    batch: dict[str, jax.Array],
    rng: jax.Array,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One AdamW step on the mean loss over the batch's real target tokens."""
    key = jax.random.fold_in(rng, state.step)

    def loss_fn(params):
        loss_sum, ntok = _forward(graphdef, params, batch, key)
        return loss_sum / jnp.maximum(ntok, 1.0), ntok

    (loss, ntok), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    adam, opt = make_tx(static).update(grads, state.opt, state.params)
    lr = learning_rate(state.step, state.hp)
    wd = state.hp["weight_decay"]
    exclude = tuple(static["decay_exclude"])
    updates = jax.tree_util.tree_map_with_path(
        lambda path, u, p: -lr * (u + wd * p if decays(path, exclude) else u),
        adam,
        state.params,
    )
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        "tokens": ntok,
        "lr": lr,
        "grad_norm": optax.global_norm(grads),
        "update_norm": optax.global_norm(updates),
        "param_norm": optax.global_norm(params),
    }
    return TrainState(state.step + 1, params, opt, state.hp), metrics


def eval_step(graphdef: nnx.GraphDef, params: nnx.State, batch: dict) -> jax.Array:
    """[summed loss, tokens] of a validation batch, summed later over batches."""
    return jnp.stack(_forward(graphdef, params, batch))
