"""What turns the pure steps of `steps.py` into a running stage: jitted programs and a trainer.

`StepFunctions` are the sharded, donating, jitted train and eval steps of one (model,
static optimizer, mesh, rules) combination; the runtime caches them and their compiled
executables. A `Trainer` owns one stage's compiled step, its state, rng and step counter:
the loop only calls `trainer.train(host_batch)`.
"""

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from retention_jax import config, data, sharding
from retention_jax import model as model_lib
from retention_jax import steps as steps_lib


@dataclasses.dataclass(frozen=True)
class StepFunctions:
    """The jitted (not yet compiled) steps of one model, optimizer, mesh and rule table."""

    graphdef: nnx.GraphDef
    mesh: jax.sharding.Mesh
    state_sharding: steps_lib.TrainState
    batch_sharding: NamedSharding
    state_shapes: steps_lib.TrainState  # ShapeDtypeStructs with shardings: AOT and restore target
    train: Callable
    evaluate: Callable
    init_opt: Callable  # params -> fresh optimizer state, in its shardings
    init_params: Callable  # PRNG key -> fresh parameters, in their shardings

    def batch_shapes(self, batch: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
        shape = (batch, seq_len)
        return {
            k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=self.batch_sharding)
            for k in data.KEYS
        }


# XLA:CPU options for the train step. YNNPACK's "dot" fusions (a matmul with the
# elementwise ops around it in one kernel) run the step's matmuls slower than plain ones;
# elementwise and reduction fusions stay (measured in docs/performance.md).
CPU_COMPILER_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_ELTWISE,LIBRARY_FUSION_TYPE_REDUCE"
}


# XLA:CPU options for the parameter init: LLVM at optimisation level 1 compiles its random
# draws in a third of the time of the default level 2 (tiny model 1.1 vs 3.8 s, 135M 1.3
# vs 3.6 s), and they run as fast and draw bit-identical values.
CPU_INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}


def compile_train(fns: StepFunctions, batch_shapes: dict) -> tuple[Callable, float]:
    """The AOT-compiled train step for `batch_shapes` and the seconds compiling took.

    Compiled under the mesh, so activations are pinned to the batch axes (`model.shard_rows`:
    without it GSPMD may replicate every row of an fsdp run on every device)."""
    start = time.perf_counter()
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
    options = CPU_COMPILER_OPTIONS if _on_cpu(fns.mesh) else None
    with jax.set_mesh(fns.mesh):
        lowered = fns.train.lower(fns.state_shapes, batch_shapes, rng)
        exe = lowered.compile(compiler_options=options)
    return exe, time.perf_counter() - start


def _on_cpu(mesh: jax.sharding.Mesh) -> bool:
    return mesh.devices.flat[0].platform == "cpu"


def abstract(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying `shardings`: a target for AOT compile and restore."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def step_functions(
    model: config.Model, optimizer: config.Optimizer, mesh: jax.sharding.Mesh, rules
) -> StepFunctions:
    """Builds the sharded, donating, jitted train and eval steps (nothing is compiled)."""
    lora_only = model.lora.rank > 0
    static = {**optimizer.static(), "lora_only": lora_only}
    tx = steps_lib.make_tx(static)
    graphdef, abs_params = model_lib.abstract_state(model, mesh, rules)

    def init_opt(params):  # optimizer state for the trained parameters only
        return tx.init(steps_lib.trainable(params, lora_only)[0])

    def init_params(key):  # a traced key: one compile serves every seed
        with nnx.logical_axis_rules(rules):
            return nnx.state(model_lib.Transformer(model, rngs=nnx.Rngs(params=key)))

    state_sh, state_shapes = _state_layout(mesh, tx, init_opt, abs_params, lora_only)
    batch_sh = sharding.batch_sharding(mesh)
    replicated = NamedSharding(mesh, P())
    train_fn = jax.jit(
        functools.partial(steps_lib.train_step, graphdef, static),
        in_shardings=(state_sh, batch_sh, replicated),
        out_shardings=(state_sh, replicated),
        donate_argnums=(0,),
    )
    eval_fn = jax.jit(
        functools.partial(steps_lib.eval_step, graphdef),
        in_shardings=(state_sh.params, batch_sh),
        out_shardings=replicated,
    )
    return StepFunctions(
        graphdef,
        mesh,
        state_sh,
        batch_sh,
        state_shapes,
        train_fn,
        eval_fn,
        jax.jit(init_opt, out_shardings=state_sh.opt),
        jax.jit(
            init_params,
            out_shardings=state_sh.params,
            compiler_options=CPU_INIT_COMPILER_OPTIONS if _on_cpu(mesh) else None,
        ),
    )


def _state_layout(
    mesh: jax.sharding.Mesh, tx, init_opt: Callable, abs_params: nnx.State, lora_only: bool
) -> tuple[steps_lib.TrainState, steps_lib.TrainState]:
    """(shardings, shapes) of the train state, the shapes as ShapeDtypeStructs carrying the
    shardings: Adam moments are sharded like their parameters; the step, the optimizer's
    counters and the hyperparameters are replicated."""
    param_sh = jax.tree.map(lambda x: x.sharding, abs_params)
    replicated = NamedSharding(mesh, P())
    abs_opt = jax.eval_shape(init_opt, abs_params)
    opt_sh = optax.tree_map_params(
        tx,
        lambda _, s: s,
        abs_opt,
        steps_lib.trainable(param_sh, lora_only)[0],
        transform_non_params=lambda _: replicated,
    )
    hp_sh = {k: replicated for k in steps_lib.HPARAMS}
    scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype, sharding=replicated)
    shapes = steps_lib.TrainState(
        scalar(jnp.int32),
        abs_params,
        abstract(abs_opt, opt_sh),
        {k: scalar(jnp.float32) for k in steps_lib.HPARAMS},
    )
    return steps_lib.TrainState(replicated, param_sh, opt_sh, hp_sh), shapes


def put_host(tree: Any, shardings: Any) -> Any:
    """Host values (or single-device arrays) as global arrays in `shardings`.

    They pass through NumPy: `jax.device_put` of a single-device jax.Array onto a sharding
    that spans processes makes an array whose shards hold every device's buffer, which
    Orbax cannot save (a stage of 0 steps saves its fresh state as it was put)."""
    return jax.device_put(jax.tree.map(np.asarray, tree), shardings)


def fresh_state(fns: StepFunctions, params: nnx.State, schedule: dict) -> steps_lib.TrainState:
    """A new optimizer and schedule around `params` (a new stage or a branch)."""
    hp = put_host(steps_lib.hparams(schedule), fns.state_sharding.hp)
    step = put_host(np.zeros((), np.int32), fns.state_sharding.step)
    return steps_lib.TrainState(step, params, fns.init_opt(params), hp)


def init_params(fns: StepFunctions, seed: int) -> nnx.State:
    """Freshly initialised parameters, each created directly in its sharding.

    The seed's key is an argument of the jitted init, not a constant in it: XLA:CPU takes
    about half a second to compile each parameter's random draw, and every seed of a graph
    shares the one compile."""
    with jax.set_mesh(fns.mesh):
        return fns.init_params(jax.random.key(seed))


class Trainer:
    """One stage's compiled train step, its state, rng and step counter."""

    def __init__(self, fns: StepFunctions, executable: Callable, state: steps_lib.TrainState, rng):
        self.fns, self.executable, self.state = fns, executable, state
        self.rng = put_host(rng, fns.state_sharding.step)
        self.step = int(jax.device_get(state.step))

    def train(self, host_batch: dict) -> dict[str, jax.Array]:
        """One step on this process's rows; metrics stay on device (no host sync)."""
        batch = data.to_global(host_batch, self.fns.mesh, self.fns.batch_sharding.spec)
        self.state, metrics = self.executable(self.state, batch, self.rng)
        self.step += 1
        return metrics
