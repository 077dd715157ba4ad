"""The pure train and eval steps shared by all three stages, and their optimizer.

A stage differs from another only in data, starting parameters and the scalar
hyperparameters in `TrainState.hp` (peak and minimum LR, warmup, length, weight decay).
Those scalars are traced, not baked into the program, so every stage with the same
model, mesh and batch shape runs one compiled executable: the whole experiment graph
compiles its train step once per shape rather than once per node.
"""

import dataclasses
import functools
import json
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections as mlc
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from retention_jax import loss as loss_lib
from retention_jax import model as model_lib
from retention_jax import sharding

HPARAMS = ("lr", "min_lr", "warmup_steps", "total_steps", "weight_decay")
# Optimizer keys that shape the program; the rest of a stage's optimizer config is in HPARAMS.
STATIC_OPT = ("b1", "b2", "eps", "clip_norm", "decay_exclude", "microbatches")


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


def hparams(opt: mlc.ConfigDict, total_steps: int) -> dict[str, jax.Array]:
    values = dict(opt.items(), total_steps=total_steps)
    return {k: jnp.asarray(values[k], jnp.float32) for k in HPARAMS}


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


cross_entropy = loss_lib.cross_entropy


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
    return cross_entropy(h_BxLxD @ model.head_weight(), batch["targets"], mask_BxL)


def _microbatches(batch: dict[str, jax.Array], n: int) -> dict[str, jax.Array]:
    """(B, L) -> (B/n, n, L): microbatch m is [:, m], rows m, m+n, m+2n, ... The row
    axis stays first and keeps its sharding (each device's block of rows contributes to
    every microbatch), so taking one moves no data; a transpose here loses the sharding
    and replicates every microbatch's activations on all devices."""
    return jax.tree.map(lambda a: a.reshape(a.shape[0] // n, n, *a.shape[1:]), batch)


def _grads(graphdef, params, batch, key, n: int):
    """(summed loss, tokens, gradient of the summed loss), over `n` microbatches.

    With n > 1 a scan runs forward and backward on one microbatch at a time and sums
    the gradients, so only one microbatch's activations are live; dividing the sums by
    the total token count later gives exactly the full batch's mean-loss gradient.
    Microbatch m draws dropout from fold_in(key, m).
    """
    value_and_grad = jax.value_and_grad(lambda p, b, k: _forward(graphdef, p, b, k), has_aux=True)
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

    `static["microbatches"]` (default 1) splits the batch for gradient accumulation
    inside this one step: one optimizer update, the same result as the whole batch.
    """
    key = jax.random.fold_in(rng, state.step)
    loss_sum, ntok, grad_sums = _grads(
        graphdef, state.params, batch, key, static.get("microbatches", 1)
    )
    scale = 1.0 / jnp.maximum(ntok, 1.0)
    loss = loss_sum * scale
    grads = jax.tree.map(lambda g: g * scale, grad_sums)
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


def _key(cfg: mlc.ConfigDict) -> str:
    return json.dumps(cfg.to_dict(), sort_keys=True, default=str)


@dataclasses.dataclass
class Steps:
    """The jitted steps of one (model, static optimizer, mesh, rules) combination."""

    graphdef: nnx.GraphDef
    static: dict
    mesh: jax.sharding.Mesh
    state_sharding: Any
    batch_sharding: NamedSharding
    state_shapes: TrainState  # ShapeDtypeStructs with shardings: AOT and restore target
    train: Callable
    evaluate: Callable
    init_opt: Callable  # params -> fresh optimizer state, in its shardings
    compiled: dict = dataclasses.field(default_factory=dict)

    def compile_train(self, batch_shapes: dict) -> tuple[Callable, float]:
        """The AOT-compiled train step for these shapes, and the seconds compiling took.

        Cached: a later stage with the same shapes reuses the executable (0 s).
        """
        key = tuple(sorted((k, v.shape) for k, v in batch_shapes.items()))
        if key in self.compiled:
            return self.compiled[key], 0.0
        start = time.perf_counter()
        rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
        exe = self.train.lower(self.state_shapes, batch_shapes, rng).compile()
        self.compiled[key] = exe
        COMPILES["train"] += 1
        return exe, time.perf_counter() - start


COMPILES = {"train": 0}  # train-step compilations in this process (tests assert on it)
_STEPS: dict[tuple, Steps] = {}


def steps_for(model_cfg: mlc.ConfigDict, opt: mlc.ConfigDict, mesh, rules) -> Steps:
    """Builds (once per combination) the sharded, donating, jitted train and eval steps."""
    static = {k: (tuple(opt[k]) if k == "decay_exclude" else opt[k]) for k in STATIC_OPT}
    key = (_key(model_cfg), json.dumps(static, sort_keys=True), mesh, tuple(map(tuple, rules)))
    if key in _STEPS:
        return _STEPS[key]
    graphdef, abs_params = model_lib.abstract_state(model_cfg, mesh, rules)
    param_sh = jax.tree.map(lambda x: x.sharding, abs_params)
    replicated = NamedSharding(mesh, P())
    abs_opt = jax.eval_shape(make_tx(static).init, abs_params)
    opt_sh = optax.tree_map_params(
        make_tx(static),
        lambda _, s: s,
        abs_opt,
        param_sh,
        transform_non_params=lambda _: replicated,
    )
    hp_sh = {k: replicated for k in HPARAMS}
    state_sh = TrainState(replicated, param_sh, opt_sh, hp_sh)
    scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype, sharding=replicated)
    state_shapes = TrainState(
        scalar(jnp.int32),
        abs_params,
        abstract(abs_opt, opt_sh),
        {k: scalar(jnp.float32) for k in HPARAMS},
    )
    batch_sh = sharding.batch_sharding(mesh)
    train = jax.jit(
        functools.partial(train_step, graphdef, static),
        in_shardings=(state_sh, batch_sh, replicated),
        out_shardings=(state_sh, replicated),
        donate_argnums=(0,),
    )
    evaluate = jax.jit(
        functools.partial(eval_step, graphdef),
        in_shardings=(param_sh, batch_sh),
        out_shardings=replicated,
    )
    init_opt = jax.jit(make_tx(static).init, out_shardings=opt_sh)
    steps = Steps(
        graphdef, static, mesh, state_sh, batch_sh, state_shapes, train, evaluate, init_opt
    )
    _STEPS[key] = steps
    return steps


def init_state(
    steps: Steps, params: nnx.State, opt: mlc.ConfigDict, total_steps: int
) -> TrainState:
    """A fresh optimizer and schedule around `params` (a new stage or a branch)."""
    hp = jax.device_put(hparams(opt, total_steps), steps.state_sharding.hp)
    step = jax.device_put(jnp.zeros((), jnp.int32), steps.state_sharding.step)
    return TrainState(step, params, steps.init_opt(params), hp)


def abstract(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying `shardings`: a target for AOT compile and restore."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )
