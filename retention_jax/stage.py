"""One stage run as named pieces: resolve the start → a trainer → the loop → finish,
sharing one `StageRun`.

Start precedence (`resolve_start`): this run's own latest checkpoint (a restarted job
continues where it stopped, bit-identically) → the parent's result parameters (a branch:
fresh optimizer, schedule and data stream, parent opened read-only, any mesh) → a fresh
initialisation. The stage's result is the step with the best validation loss under
early stopping and the last step otherwise; `result.json` is written last and
atomically, so a run directory holding it is finished and is never run again.
"""

import dataclasses
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import jax
from clu import parameter_overview
from etils import epath
from flax import nnx

from retention_jax import callbacks as cb
from retention_jax import (
    checkpoint,
    config,
    data,
    evaluate,
    fileio,
    forecast,
    graph,
    tensorboard,
    trainer,
)
from retention_jax import model as model_lib
from retention_jax import runtime as runtime_lib

RESULT = "result.json"
PARAMETERS = "parameters.txt"


@dataclasses.dataclass(frozen=True)
class Start:
    kind: str  # "resume" | "branch" | "init"
    step: int | None = None  # own checkpoint step (resume) or the parent's result step (branch)
    parent_dir: str | None = None


def resolve_start(latest_step: int | None, parent: tuple[str, int] | None) -> Start:
    """Own latest checkpoint, else the parent's result parameters, else a fresh init."""
    if latest_step is not None:
        return Start("resume", latest_step)
    if parent is not None:
        return Start("branch", parent[1], parent[0])
    return Start("init")


def read_result(run_dir: str) -> dict | None:
    return fileio.read_json(os.path.join(run_dir, RESULT))


def _optimizer_item(state) -> dict:
    return {"step": state.step, "opt": state.opt, "hp": state.hp}


@dataclasses.dataclass
class StageRun:
    """What the pieces of one stage run share: the resolved node, where it writes, its
    data, the runtime and step functions, the data iterator and checkpoint manager, and
    once started the trainer, its record, metrics log and callbacks. Callbacks receive
    it; `save` is the one way to checkpoint, so no callback holds another."""

    node: graph.Node
    run_dir: str
    corpus: data.Corpus
    rt: runtime_lib.Runtime
    fns: trainer.StepFunctions
    batches: Iterator  # the resumable host-batch iterator (checkpointed with the state)
    mngr: Any  # the Orbax CheckpointManager of run_dir/ckpt
    meta: dict  # lineage recorded in every checkpoint (ids, swept values, stage)
    trainer: "trainer.Trainer | None" = None  # (a string: the field shadows the module)
    record: cb.Record | None = None
    log: cb.MetricsLog | None = None
    callbacks: list[cb.Callback] = dataclasses.field(default_factory=list)

    @property
    def name(self) -> str:
        return os.path.basename(self.run_dir)

    def losses(self, domains: tuple[str, ...], params=None) -> dict[str, float]:
        """Validation losses of the current parameters (or `params`) on `domains`."""
        params = self.trainer.state.params if params is None else params
        batch = self.node.exp.eval_batch
        return evaluate.losses(self.rt, self.fns, params, self.corpus, domains, batch)

    def save(self, step: int, metrics: dict | None, val_loss=None, log_line=True) -> None:
        """Checkpoints `step`: every callback's `before_save` first (metrics logged or
        checked, token counts synced), then the metrics file, then the state."""
        for c in self.callbacks:
            c.before_save(step, metrics, log_line)
        if not log_line and metrics is not None:
            host = {k: float(v) for k, v in jax.device_get(metrics).items()}
            cb.check_finite(step, host, self.mngr.latest_step())
        self.log.flush()
        state = self.trainer.state
        checkpoint.save(
            self.mngr,
            step,
            params=state.params,
            optimizer=_optimizer_item(state),
            data_iter=self.batches,
            meta=fileio.as_stored({**self.meta, **self.record.meta(), "step": step}),
            val_loss=val_loss,
        )


def start_state(run: StageRun, start: Start):
    """The training state and record `start` names; a resume also restores the batches."""
    node, fns = run.node, run.fns
    if start.kind == "resume":
        return _resume(run.mngr, fns, run.batches)
    if start.kind == "branch":  # parameters only
        params = _branch_params(start, fns, node)
    elif node.stage == "pretrain" and node.exp.pretrain.init:
        from retention_jax import hf  # the hf extra (safetensors); only this start needs it

        spec = node.exp.pretrain.init.removeprefix("hf:")
        params = hf.init_params(spec, node.model, fns.mesh, node.exp.rules, seed=node.exp.seed)
    else:
        params = trainer.init_params(fns, node.exp.seed)
    return trainer.fresh_state(fns, params, node.schedule), cb.Record.fresh()


def _branch_params(start: Start, fns: trainer.StepFunctions, node: graph.Node):
    """The parent's result parameters in this stage's model: LoRA adapters start fresh
    (B = 0, so the function is the parent's) when post-training adds them, and are
    merged into the weights when fine-tuning follows a LoRA post-training."""
    ckpt = os.path.join(start.parent_dir, "ckpt")
    parent_model, model = node.parent.model, node.model
    try:
        if parent_model.lora.rank > 0:
            _, target = model_lib.abstract_state(parent_model, fns.mesh, node.exp.rules)
            restored = checkpoint.restore_params(ckpt, start.step, target)
        elif model.lora.rank > 0:
            base, _ = nnx.split_state(fns.state_shapes.params, model_lib.BASE_PARAMS, ...)
            restored = checkpoint.restore_params(ckpt, start.step, base)
        else:
            return checkpoint.restore_params(ckpt, start.step, fns.state_shapes.params)
    except Exception as e:
        raise RuntimeError(
            f"parent {start.parent_dir} finished, but its result step {start.step} cannot "
            f"be restored from {ckpt} ({type(e).__name__}: {e}); rerun the parent: remove "
            f"{os.path.join(start.parent_dir, RESULT)} and run the same command"
        ) from e
    if model.lora.rank > 0:
        fresh = trainer.init_params(fns, node.seed)
        return nnx.merge_state(restored, nnx.split_state(fresh, model_lib.LoRAParam, ...)[0])
    merged, _ = model_lib.merge_lora(nnx.to_pure_dict(restored), parent_model)
    return model_lib.put_pure(fns.state_shapes.params, merged)


def _resume(mngr, fns: trainer.StepFunctions, batches):
    """The newest restorable step of this run: a damaged latest step (a crash mid-save
    on a store without atomic renames, a truncated file) falls back to the one before."""
    shapes = fns.state_shapes
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            params, opt, meta = checkpoint.restore(
                mngr,
                step,
                params=shapes.params,
                optimizer=_optimizer_item(shapes),
                data_iter=batches,
            )
        except Exception as e:  # Orbax raises many types for damaged files
            logging.warning(
                "%s: step %d cannot be restored (%s: %s); trying the one before",
                mngr.directory,
                step,
                type(e).__name__,
                e,
            )
            continue
        logging.warning("%s: resumed at step %d", mngr.directory, step)
        state = type(shapes)(opt["step"], params, opt["opt"], opt["hp"])
        return state, cb.Record.from_meta(meta)
    raise RuntimeError(
        f"{mngr.directory}: no checkpoint step can be restored ({mngr.all_steps()}); delete "
        "that directory to restart this stage from its beginning"
    )


def callbacks(run: StageRun) -> tuple[list[cb.Callback], cb.EarlyStopRule]:
    """The stage's callbacks in the order of their effects, and its early-stopping rule."""
    exp = run.node.exp
    es = exp.posttrain.early_stop
    rule = cb.EarlyStopRule(es.patience, es.min_delta, run.record.early_stop)
    steps = [
        cb.TokenCount(run.record),
        cb.Progress(run),
        cb.Validation(run, rule if run.node.early_stopping else None),
        cb.Checkpointing(run),
    ]
    if exp.profile_steps:
        steps.append(cb.Profile(run.run_dir, *exp.profile_steps))
    return [*steps, cb.Preemption(run)], rule


def show_parameters(rt: runtime_lib.Runtime, params, run_dir: str) -> None:
    """The parameter overview (clu: names, shapes, sizes, shardings, total) in the run
    directory's parameters.txt; printed in full once per distinct table in this process,
    as one line after that (a graph's nodes mostly share one model and mesh)."""
    if jax.process_index() != 0:
        return
    pure = nnx.to_pure_dict(params)
    table = parameter_overview.get_parameter_overview(pure, include_stats="sharding")
    path = os.path.join(run_dir, PARAMETERS)
    fileio.write_text(path, table + "\n")
    name = os.path.basename(run_dir)
    if rt.first_sight(table):
        print(f"{name} parameters ({path}):\n{table}", flush=True)
    else:
        count = parameter_overview.count_parameters(pure)
        print(f"{name} parameters: {count:,}, as in the table above ({path})", flush=True)


def run(
    node: graph.Node,
    run_dir: str,
    corpus: data.Corpus,
    rt: runtime_lib.Runtime,
    parent: tuple[str, int] | None = None,
    extra_callbacks: Sequence[cb.Callback] = (),
) -> dict:
    """Runs (or finishes) `node`'s stage in `run_dir` and returns its result.

    `parent` is (parent run directory, its result step) for a branched stage;
    `extra_callbacks` run after the stage's own (fault injection in tests).
    """
    done = read_result(run_dir)
    if done is not None:
        return done
    if jax.process_index() == 0:
        epath.Path(run_dir).mkdir(parents=True, exist_ok=True)
    run = _open(node, run_dir, corpus, rt, parent)
    state, run.record = start_state(run, resolve_start(run.mngr.latest_step(), parent))
    show_parameters(rt, state.params, run_dir)
    plan = node.plan
    executable = None
    if int(jax.device_get(state.step)) < plan.num_steps:
        executable, run.record.compiled_s = rt.train_executable(run.fns, plan.batch, plan.seq_len)
    rng = jax.random.fold_in(jax.random.PRNGKey(node.seed), config.STAGES.index(node.stage))
    run.trainer = trainer.Trainer(run.fns, executable, state, rng)
    run.log = cb.MetricsLog(run_dir, run.trainer.step)
    try:
        own, rule = callbacks(run)
        run.callbacks = [*own, *extra_callbacks]
        early = node.early_stopping
        try:
            cb.run_loop(
                run.trainer, run.batches, run.callbacks, plan.num_steps, early and rule.stopped
            )
        finally:  # a failing stage still commits the checkpoint it was writing
            run.mngr.wait_until_finished()
        run.mngr.close()
        result_step = rule.best_step if early and run.record.evals else run.trainer.step
        return finish(run, result_step, early and rule.stopped)
    finally:
        run.log.close()


def _open(node, run_dir, corpus, rt, parent) -> StageRun:
    """The stage's step functions, data iterator and checkpoint manager."""
    batches = data.loader(
        corpus,
        node.plan,
        node.exp.data.read_threads,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    meta = {
        "id": node.id,
        "parent": node.parent.id if node.parent else None,
        "parent_step": parent[1] if parent else None,
        "swept": node.swept,
        "stage": node.stage,
    }
    fns = rt.step_functions(node.model, node.optimizer)
    mngr = checkpoint.manager(os.path.join(run_dir, "ckpt"))
    return StageRun(node, run_dir, corpus, rt, fns, batches, mngr, meta)


def finish(run: StageRun, result_step: int, stopped: bool) -> dict:
    """Evaluates the result step on every domain, logs it as `final/<domain>` at that step,
    adds the forecast probes after post-training and writes `result.json` (last), so
    every child reads them."""
    node, state = run.node, run.trainer.state
    params = state.params
    if result_step != run.trainer.step:
        ckpt = os.path.join(run.run_dir, "ckpt")
        params = checkpoint.restore_params(ckpt, result_step, run.fns.state_shapes.params)
    val = run.losses(data.DOMAINS, params)
    cb.check_finite(result_step, {f"val/{d}": v for d, v in val.items()})
    run.log.write_final(result_step, {f"{tensorboard.FINAL}{d}": v for d, v in val.items()})
    run.log.close()
    result = {
        "stage": node.stage,
        "steps": run.trainer.step,
        "planned_steps": node.plan.num_steps,
        "result_step": result_step,
        "stopped_early": stopped,
        "val": val,
        "tokens": dict(zip(data.DOMAINS, run.record.tokens)),
        "planned_tokens": node.plan.tokens,
        "evals": run.record.evals,
        **run.record.timing(),
    }
    if node.stage == "posttrain" and node.exp.forecast.probes:
        result["forecast"] = forecast.at_theta_post(run.rt, run.fns, node.exp, params, run.corpus)
    if jax.process_index() == 0:
        fileio.write_json(os.path.join(run.run_dir, RESULT), result)
    return result
