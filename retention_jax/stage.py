"""One stage run as named pieces: resolve the start → a trainer → the loop → finish.

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
from collections.abc import Sequence

import jax
from clu import parameter_overview
from etils import epath
from flax import nnx

from retention_jax import callbacks as cb
from retention_jax import checkpoint, config, data, evaluate, fileio, forecast, tensorboard, trainer
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


def start_state(start: Start, fns: trainer.StepFunctions, mngr, batches, exp, name, plan):
    """The training state and record `start` names; a resume also restores `batches`."""
    section = exp.stage(name)
    if start.kind == "resume":
        return _resume(mngr, fns, batches)
    if start.kind == "branch":  # parameters only
        params = _branch_params(start, fns, exp, name)
    elif name == "pretrain" and exp.pretrain.init:
        from retention_jax import hf  # the hf extra (safetensors); only this start needs it

        spec = exp.pretrain.init.removeprefix("hf:")
        params = hf.init_params(spec, exp.model_for(name), fns.mesh, exp.rules, seed=exp.seed)
    else:
        params = trainer.init_params(fns, exp.seed)
    schedule = section.optimizer.schedule(plan.num_steps, plan.batch * plan.seq_len)
    return trainer.fresh_state(fns, params, schedule), cb.Record.fresh()


def _branch_params(start: Start, fns: trainer.StepFunctions, exp, name: str):
    """The parent's result parameters in this stage's model: LoRA adapters start fresh
    (B = 0, so the function is the parent's) when post-training adds them, and are
    merged into the weights when fine-tuning follows a LoRA post-training."""
    ckpt = os.path.join(start.parent_dir, "ckpt")
    parent_model = exp.model_for(config.STAGES[config.STAGES.index(name) - 1])
    model = exp.model_for(name)
    try:
        if parent_model.lora.rank > 0:
            _, target = model_lib.abstract_state(parent_model, fns.mesh, exp.rules)
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
        fresh = trainer.init_params(fns, exp.stage_seed(name))
        return nnx.merge_state(restored, nnx.split_state(fresh, model_lib.LoRAParam, ...)[0])
    merged, _ = model_lib.merge_lora(nnx.to_pure_dict(restored), parent_model)
    shapes = fns.state_shapes.params
    params = jax.tree.map(lambda a: a, shapes)  # a copy to fill in
    nnx.replace_by_pure_dict(params, merged)
    return jax.tree.map(lambda a, s: jax.device_put(a, s.sharding), params, shapes)


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


def callbacks(name, exp, run_dir, corpus, rt, t, plan, record, mngr, batches, meta, log):
    """The stage's callbacks in the order of their effects, and its early-stopping rule."""
    model = exp.model_for(name)
    flops = model_lib.flops_per_token(model, plan.seq_len)
    peak = rt.peak_flops(model.dtype)
    progress = cb.Progress(log, os.path.basename(run_dir), plan, flops, peak, t.step, exp.log_every)
    tokens = cb.TokenCount(record)
    es = exp.posttrain.early_stop
    rule = cb.EarlyStopRule(es.patience, es.min_delta, record.early_stop)
    early = exp.early_stopping(name)

    def losses(domains: tuple[str, ...]) -> dict[str, float]:
        return evaluate.losses(rt, t.fns, t.state.params, corpus, domains, exp.eval_batch)

    validation = cb.Validation(
        losses, exp.eval_every or exp.ckpt_every, log, record, rule if early else None, es.every
    )

    def items() -> dict:
        return {"params": t.state.params, "optimizer": _optimizer_item(t.state)}

    saving = cb.Checkpointing(
        mngr,
        exp.ckpt_every,
        60.0 * exp.ckpt_every_minutes,
        exp.log_every,
        items,
        batches,
        progress,
        tokens,
        log,
        record,
        {**(meta or {}), "stage": name},
    )
    steps = [tokens, progress, validation, saving]
    if exp.profile_steps:
        steps.append(cb.Profile(run_dir, *exp.profile_steps))
    return [*steps, cb.Preemption(saving)], rule


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
    name: str,
    exp: config.Experiment,
    run_dir: str,
    corpus: data.Corpus,
    rt: runtime_lib.Runtime,
    parent: tuple[str, int] | None = None,
    meta: dict | None = None,
    extra_callbacks: Sequence[cb.Callback] = (),
) -> dict:
    """Runs (or finishes) stage `name` of node `exp` in `run_dir` and returns its result.

    `parent` is (parent run directory, its result step) for a branched stage; `meta` is
    lineage recorded in every checkpoint (ids, swept values); `extra_callbacks` run after
    the stage's own (fault injection in tests).
    """
    done = read_result(run_dir)
    if done is not None:
        return done
    if jax.process_index() == 0:
        epath.Path(run_dir).mkdir(parents=True, exist_ok=True)
    plan = data.plan(name, exp)
    fns = rt.step_functions(exp.model_for(name), exp.stage(name).optimizer)
    batches = data.loader(
        corpus,
        plan,
        exp.data.read_threads,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    mngr = checkpoint.manager(os.path.join(run_dir, "ckpt"))
    start = resolve_start(mngr.latest_step(), parent)
    state, record = start_state(start, fns, mngr, batches, exp, name, plan)
    show_parameters(rt, state.params, run_dir)
    executable = None
    if int(jax.device_get(state.step)) < plan.num_steps:
        executable, record.compiled_s = rt.train_executable(fns, plan.batch, plan.seq_len)
    rng = jax.random.fold_in(jax.random.PRNGKey(exp.stage_seed(name)), config.STAGES.index(name))
    t = trainer.Trainer(fns, executable, state, rng)
    log = cb.MetricsLog(run_dir, t.step)
    try:
        steps, rule = callbacks(
            name, exp, run_dir, corpus, rt, t, plan, record, mngr, batches, meta, log
        )
        early = exp.early_stopping(name)
        try:
            loop = [*steps, *extra_callbacks]
            cb.run_loop(t, batches, loop, plan.num_steps, early and rule.stopped)
        finally:  # a failing stage still commits the checkpoint it was writing
            mngr.wait_until_finished()
        mngr.close()
        result_step = rule.best_step if early and record.evals else t.step
        stopped = early and rule.stopped
        return finish(name, exp, run_dir, corpus, rt, t, plan, record, result_step, stopped, log)
    finally:
        log.close()


def finish(name, exp, run_dir, corpus, rt, t, plan, record, result_step, stopped, log) -> dict:
    """Evaluates the result step on every domain, logs it as `final/<domain>` at that step,
    adds the forecast probes after post-training and writes `result.json` (last), so
    every child reads them."""
    params = t.state.params
    if result_step != t.step:
        ckpt = os.path.join(run_dir, "ckpt")
        params = checkpoint.restore_params(ckpt, result_step, t.fns.state_shapes.params)
    val = evaluate.losses(rt, t.fns, params, corpus, data.DOMAINS, exp.eval_batch)
    cb.check_finite(result_step, {f"val/{d}": v for d, v in val.items()})
    log.write_final(result_step, {f"{tensorboard.FINAL}{d}": v for d, v in val.items()})
    log.close()
    result = {
        "stage": name,
        "steps": t.step,
        "planned_steps": plan.num_steps,
        "result_step": result_step,
        "stopped_early": stopped,
        "val": val,
        "tokens": dict(zip(data.DOMAINS, record.tokens)),
        "planned_tokens": plan.tokens,
        "evals": record.evals,
        **record.timing(),
    }
    if name == "posttrain" and exp.forecast.probes:
        result["forecast"] = forecast.at_theta_post(rt, t.fns, exp, params, corpus)
    if jax.process_index() == 0:
        fileio.write_json(os.path.join(run_dir, RESULT), result)
    return result
