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

from retention_jax import loss as loss_lib

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


def _forward(graphdef, params, batch, dropout_key=None):
    """(summed loss, real target tokens) of one batch."""
    model = nnx.merge(graphdef, params)
    args = (batch["inputs"], batch["positions"], batch["segment_ids"])
    h_BxLxD = model.hidden(*args, dropout_key=dropout_key)
    mask_BxL = batch["segment_ids"] > 0
    if model.cfg.loss_chunk:
        return loss_lib.head_cross_entropy(
            h_BxLxD, model.head_weight(), batch["targets"], mask_BxL, model.cfg.loss_chunk
        )
    return loss_lib.cross_entropy(h_BxLxD @ model.head_weight(), batch["targets"], mask_BxL)


def _microbatches(batch: dict[str, jax.Array], n: int) -> dict[str, jax.Array]:
    """(B, L) -> (B/n, n, L): microbatch m is [:, m], rows m, m+n, m+2n, ... The row
    axis stays first and keeps its sharding (each device's block of rows contributes to
    every microbatch), so taking one moves no data; a transpose here loses the sharding
    and replicates every microbatch's activations on all devices."""
    return jax.tree.map(lambda a: a.reshape(a.shape[0] // n, n, *a.shape[1:]), batch)


def trainable(params: nnx.State, lora_only: bool) -> tuple[nnx.State, nnx.State | None]:
    """(what the optimizer updates, what stays frozen): the LoRA adapters and the base
    weights under LoRA post-training, else every parameter and nothing."""
    if not lora_only:
        return params, None
    return nnx.split_state(params, nnx.LoRAParam, ...)


def _grads(graphdef, params, batch, key, n: int, frozen: nnx.State | None = None):
    """(summed loss, tokens, gradient of the summed loss), over `n` microbatches.

    With n > 1 a scan runs forward and backward on one microbatch at a time and sums
    the gradients, so only one microbatch's activations are live; dividing the sums by
    the total token count later gives exactly the full batch's mean-loss gradient.
    Microbatch m draws dropout from fold_in(key, m).
    """

    def loss(p, b, k):
        return _forward(graphdef, p if frozen is None else nnx.merge_state(p, frozen), b, k)

    value_and_grad = jax.value_and_grad(loss, has_aux=True)
    if n == 1:
        (loss_sum, ntok), grads = value_and_grad(params, batch, key)
        return loss_sum, ntok, grads

    split = _microbatches(batch, n)

    def body(carry, m):
        loss_acc, tok_acc, grad_acc = carry
        mb = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, m, 1, keepdims=False), split)
        k = None if key is None else jax.random.fold_in(key, m)
        (loss_sum, ntok), grads = value_and_grad(params, mb, k)
        return (loss_acc + loss_sum, tok_acc + ntok, jax.tree.map(jnp.add, grad_acc, grads)), None

    zero = jnp.zeros((), jnp.float32)
    init = (zero, zero, jax.tree.map(jnp.zeros_like, params))
    (loss_sum, ntok, grads), _ = jax.lax.scan(body, init, jnp.arange(n))
    return loss_sum, ntok, grads


def train_step(
    graphdef: nnx.GraphDef,
    static: dict,
    state: TrainState,
    batch: dict[str, jax.Array],
    rng: jax.Array,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One AdamW step on the mean loss over the batch's real target tokens.

    `static["microbatches"]` splits the batch for gradient accumulation inside this one
    step: one optimizer update, the same result as the whole batch. Under
    `static["lora_only"]` only the adapters get gradients and optimizer state.
    """
    key = jax.random.fold_in(rng, state.step)
    train_params, frozen = trainable(state.params, static["lora_only"])
    n = static["microbatches"]
    loss_sum, ntok, grad_sums = _grads(graphdef, train_params, batch, key, n, frozen)
    scale = 1.0 / jnp.maximum(ntok, 1.0)
    loss = loss_sum * scale
    grads = jax.tree.map(lambda g: g * scale, grad_sums)
    adam, opt = make_tx(static).update(grads, state.opt, train_params)
    lr = learning_rate(state.step, state.hp)
    wd = state.hp["weight_decay"]
    exclude = tuple(static["decay_exclude"])
    updates = jax.tree_util.tree_map_with_path(
        lambda path, u, p: -lr * (u + wd * p if decays(path, exclude) else u),
        adam,
        train_params,
    )
    params = optax.apply_updates(train_params, updates)
    if frozen is not None:
        params = nnx.merge_state(params, frozen)
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
