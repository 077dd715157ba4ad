"""One stage run: resume or branch or initialise, the step loop, early stopping, results.

Restore precedence: this run's own latest checkpoint (a restarted job continues where
it stopped, bit-identically) → the parent's result parameters (a branch: fresh
optimizer, schedule and data stream, parent opened read-only, any mesh) → a fresh
initialisation. The stage's result is the step with the best validation loss under
early stopping and the last step otherwise; `result.json` is written last and
atomically, so a run directory holding it is finished and is never run again.
"""

import json
import logging
import math
import os
import time
import uuid
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from etils import epath
from flax import nnx

from retention_jax import checkpoint, data, evaluate, perf
from retention_jax import model as model_lib
from retention_jax import train as train_lib

STAGES = data.STAGES
RESULT = "result.json"


def model_config(cfg: mlc.ConfigDict, stage: str) -> mlc.ConfigDict:
    """The model of a stage: stage 2 applies its one dropout rate at all four sites."""
    m = mlc.ConfigDict(cfg.model.to_dict())
    if stage == "posttrain":
        for site in m.dropout:
            m.dropout[site] = float(cfg.posttrain.dropout)
    return m


def write_text(path: str, text: str) -> None:
    """Writes through a temporary file and a rename: readers never see half a file.

    Paths may be local or remote (gs://), like every run-directory path.
    """
    target = epath.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f"{target.name}.{uuid.uuid4().hex}.tmp"
    tmp.write_text(text)
    tmp.replace(target)


def write_json(path: str, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=1, sort_keys=True))


def read_json(path: str) -> Any | None:
    p = epath.Path(path)
    return json.loads(p.read_text()) if p.exists() else None


def read_result(run_dir: str) -> dict | None:
    return read_json(os.path.join(run_dir, RESULT))


class _EarlyStop:
    """Best validation loss so far and evaluations since it improved."""

    def __init__(self, patience: int, min_delta: float, state: dict | None = None):
        self.patience, self.min_delta = patience, min_delta
        s = state or {"best": math.inf, "best_step": 0, "bad": 0}
        self.best, self.best_step, self.bad = s["best"], s["best_step"], s["bad"]

    def update(self, step: int, loss: float) -> bool:
        """Records an evaluation; True when training should stop."""
        if loss < self.best - self.min_delta:
            self.best, self.best_step, self.bad = loss, step, 0
        else:
            self.bad += 1
        return self.stopped

    @property
    def stopped(self) -> bool:
        return self.patience > 0 and self.bad >= self.patience

    def state(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "bad": self.bad}


class _Log:
    """JSONL metrics always, clu/TensorBoard when TensorFlow is installed; process 0 only.

    Lines are kept and the file rewritten whole at each checkpoint (remote stores do
    not append); after a resume, lines past the resumed step are dropped.
    """

    def __init__(self, run_dir: str, resumed_step: int):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(run_dir, "metrics.jsonl")
        old = epath.Path(self.path)
        lines = old.read_text().splitlines() if self.enabled and old.exists() else []
        self.lines = [x for x in lines if json.loads(x)["step"] <= resumed_step]
        self.writer = None
        if self.enabled:
            try:
                from clu import metric_writers  # imports TensorFlow

                self.writer = metric_writers.create_default_writer(run_dir, asynchronous=False)
            except ImportError:
                pass

    def write(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        self.lines.append(json.dumps({"step": step, **scalars}))
        if self.writer is not None:
            self.writer.write_scalars(step, scalars)

    def flush(self) -> None:
        if self.enabled:
            write_text(self.path, "".join(x + "\n" for x in self.lines))
        if self.writer is not None:
            self.writer.flush()


def _check_finite(step: int, metrics: dict) -> None:
    if not all(np.isfinite(v) for v in metrics.values()):
        raise FloatingPointError(
            f"non-finite metrics at step {step}: {metrics}; the last checkpoint is kept"
        )


class _Reporter:
    """Training metrics: read one step late (no wait on the step just dispatched), checked
    for NaN/Inf, logged with throughput; one progress line per report."""

    def __init__(self, log: _Log, name: str, plan, flops: float, peak: float, step: int):
        self.log, self.name, self.plan, self.flops, self.peak = log, name, plan, flops, peak
        self.pending = None
        self.mark = (time.perf_counter(), step)

    def flush(self) -> None:
        if self.pending is None:
            return
        step, metrics = self.pending
        self.pending = None
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        _check_finite(step, m)
        now = time.perf_counter()
        done = step - self.mark[1]
        m.update(perf.throughput(m["tokens"] * done, now - self.mark[0], self.flops, self.peak))
        self.mark = (now, step)
        self.log.write(step, m)
        left = (self.plan.num_steps - step) * self.plan.batch * self.plan.seq_len
        if self.log.enabled:
            print(
                f"{self.name} step {step}/{self.plan.num_steps} loss {m['loss']:.4f} "
                f"{m['tokens_per_s']:,.0f} tok/s MFU {m['mfu']:.1%} "
                f"ETA {left / max(m['tokens_per_s'], 1e-9):.0f}s",
                flush=True,
            )


def _global_sum(local: np.ndarray) -> np.ndarray:
    """Sums per-process counts over processes (a collective: call at sync points only)."""
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(local)).sum(0)


def run(
    stage: str,
    cfg: mlc.ConfigDict,
    run_dir: str,
    corpus: Any,
    mesh: jax.sharding.Mesh,
    parent: tuple[str, int] | None = None,
    meta: dict | None = None,
) -> dict:
    """Runs (or finishes) one stage in `run_dir` and returns its result.

    `parent` is (parent run directory, its result step) for a branched stage; `meta`
    is lineage recorded in every checkpoint (ids, swept values).
    """
    done = read_result(run_dir)
    if done is not None:
        return done
    if jax.process_index() == 0:
        epath.Path(run_dir).mkdir(parents=True, exist_ok=True)
    wall_start = time.perf_counter()
    sc = cfg[stage]
    plan = data.plan(stage, cfg)
    mcfg = model_config(cfg, stage)
    steps = train_lib.steps_for(mcfg, sc, mesh, cfg.rules)
    rng = jax.device_put(
        jax.random.fold_in(jax.random.PRNGKey(cfg.seed), STAGES.index(stage)),
        steps.state_sharding.step,
    )
    it = data.loader(
        corpus, plan, cfg, process_index=jax.process_index(), process_count=jax.process_count()
    )
    mngr = checkpoint.manager(os.path.join(run_dir, "ckpt"))
    shapes = steps.state_shapes
    es_cfg = sc.get("early_stop", mlc.ConfigDict({"every": 0, "patience": 0, "min_delta": 0.0}))
    early = stage == "posttrain" and es_cfg.every > 0 and not cfg.posttrain.compute_matched
    # Saved in every checkpoint's meta: global tokens per domain up to the saved step,
    # evaluations, the early-stopping state, wall and compile seconds of earlier attempts.
    progress = {
        "tokens": [0] * len(data.DOMAINS),
        "evals": [],
        "early_stop": None,
        "wall_s": 0.0,
        "compile_s": 0.0,
    }

    latest = mngr.latest_step()
    if latest is not None:  # resume this run
        params, opt, saved = checkpoint.restore(
            mngr, latest, params=shapes.params, opt=_opt_item(shapes), data_iter=it
        )
        state = train_lib.TrainState(opt["step"], params, opt["opt"], opt["hp"])
        progress = {k: saved[k] for k in progress}
        logging.warning("%s: resumed at step %d", run_dir, latest)
    else:
        if parent is not None:  # branch: parameters only
            params = checkpoint.restore_params(
                os.path.join(parent[0], "ckpt"), parent[1], shapes.params
            )
        else:
            params = nnx.state(model_lib.create(mcfg, mesh, cfg.rules, cfg.seed))
        state = train_lib.init_state(steps, params, sc, plan.num_steps)
    stopper = _EarlyStop(es_cfg.patience, es_cfg.min_delta, progress["early_stop"])

    if 0 < plan.num_steps <= sc.warmup_steps:
        logging.warning(
            "%s: %s.warmup_steps=%d covers the whole stage of %d steps; the LR never peaks",
            run_dir,
            stage,
            sc.warmup_steps,
            plan.num_steps,
        )
    step = int(jax.device_get(state.step))
    compile_s = 0.0
    if step < plan.num_steps:
        exe, compile_s = steps.compile_train(_batch_shapes(plan, steps))
    log = _Log(run_dir, step)
    if mcfg.dtype not in _PEAK:
        _PEAK[mcfg.dtype] = perf.peak_flops(dtype=mcfg.dtype)[0]
    flops = model_lib.flops_per_token(mcfg, plan.seq_len)
    reporter = _Reporter(log, os.path.basename(run_dir), plan, flops, _PEAK[mcfg.dtype], step)
    local_tokens = np.zeros(len(data.DOMAINS), np.int64)  # this process's rows since a save
    stopped = early and stopper.stopped

    def timing() -> dict:
        return {
            "wall_s": progress["wall_s"] + time.perf_counter() - wall_start,
            "compile_s": progress["compile_s"] + compile_s,
        }

    def save(metrics, val_loss=None):
        """Checks and logs this step's metrics, then checkpoints it (best candidates ranked)."""
        if metrics is not None:
            reporter.pending = (step, metrics)
        reporter.flush()
        progress["tokens"] = (np.asarray(progress["tokens"]) + _global_sum(local_tokens)).tolist()
        local_tokens[:] = 0
        log.flush()
        record = {**(meta or {}), **progress, **timing(), "early_stop": stopper.state()}
        checkpoint.save(
            mngr,
            step,
            params=state.params,
            opt=_opt_item(state),
            data_iter=it,
            meta=json.loads(json.dumps({**record, "stage": stage, "step": step})),
            val_loss=val_loss,
        )

    metrics = None
    try:
        while step < plan.num_steps and not stopped:
            host = next(it)
            local_tokens += data.tokens_by_domain(host)
            batch = data.to_global(host, mesh, steps.batch_sharding.spec)
            state, metrics = exe(state, batch, rng)
            step += 1
            reporter.flush()  # the previous step's metrics, now that this one is dispatched
            if early and (step % es_cfg.every == 0 or step == plan.num_steps):
                val = evaluate.losses(steps, state.params, corpus, ("post",), cfg.eval.batch)
                _check_finite(step, {"val/post": val["post"]})
                progress["evals"].append([step, val["post"]])
                stopped = stopper.update(step, val["post"])
                log.write(step, {"val/post": val["post"]})
                save(metrics, val_loss=val["post"] if stopper.best_step == step else None)
            elif step % cfg.ckpt.every == 0 or step == plan.num_steps:
                save(metrics)
            elif step % cfg.log.every == 0:
                reporter.pending = (step, metrics)
        if mngr.latest_step() != step:  # a stage of no steps, or resumed at its end
            save(metrics)
    finally:  # a failing stage still commits the checkpoint it was writing
        mngr.wait_until_finished()

    result_step = stopper.best_step if early and progress["evals"] else step
    params = state.params
    if result_step != step:
        params = checkpoint.restore_params(
            os.path.join(run_dir, "ckpt"), result_step, shapes.params
        )
    val = evaluate.losses(steps, params, corpus, data.DOMAINS, cfg.eval.batch)
    mngr.close()
    result = {
        "stage": stage,
        "steps": step,
        "planned_steps": plan.num_steps,
        "result_step": result_step,
        "stopped_early": stopped,
        "val": val,
        "tokens": dict(zip(data.DOMAINS, progress["tokens"])),
        "planned_tokens": plan.tokens,
        "evals": progress["evals"],
        **timing(),
    }
    if jax.process_index() == 0:
        write_json(os.path.join(run_dir, RESULT), result)
    return result


_PEAK: dict[str, float] = {}  # compute dtype -> peak FLOP/s per device, measured once


def _opt_item(state: train_lib.TrainState) -> dict:
    return {"step": state.step, "opt": state.opt, "hp": state.hp}


def _batch_shapes(plan, steps: train_lib.Steps) -> dict:
    shape = (plan.batch, plan.seq_len)
    return {
        k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=steps.batch_sharding) for k in data.KEYS
    }
