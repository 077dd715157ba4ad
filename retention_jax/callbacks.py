"""The stage loop and the callbacks it calls after every step, each at its own cadence.

The loop only trains and calls callbacks; callbacks read the step's `StepInfo` and may
ask for a checkpoint of this step or for the stage to end after it. Their order is the
order of their effects: token counts, metrics and progress, validation with early
stopping, checkpointing, profiling, then anything a caller adds (a test's fault
injection). Callbacks that need the stage's state receive the stage run
(`stage.StageRun`: its node, trainer, record, metrics log); a checkpoint is taken by
`run.save`, which first calls every callback's `before_save`, so no callback holds
another. No callback waits on the device except at its own cadence.
"""

import dataclasses
import json
import logging
import math
import os
import signal
import threading
import time

import jax
import numpy as np
from etils import epath

from retention_jax import cost, data, fileio, perf, tensorboard


@dataclasses.dataclass
class StepInfo:
    """One finished step as the callbacks see it; they may set the last three fields."""

    step: int
    num_steps: int
    host: dict  # this process's rows of the batch just trained on
    metrics: dict  # the step's metrics, still on device
    stop: bool = False  # end the stage after this step
    checkpoint: bool = False  # checkpoint this step
    val_loss: float | None = None  # with `checkpoint`: ranks the step as a best candidate


class Callback:
    def on_start(self, trainer) -> None:
        """Before the first step of this attempt (the trainer holds the start state)."""

    def after_step(self, info: StepInfo) -> None:
        """After each step."""

    def before_save(self, step: int, metrics: dict | None, log_line: bool) -> None:
        """Before a checkpoint of `step` (`log_line`: a step-scheduled save, whose metrics
        line is written)."""

    def on_end(self, trainer, info: StepInfo | None) -> None:
        """After the last step of the stage (`info` is None when no step ran)."""

    def close(self) -> None:
        """When the loop ends, however it ends (an exception included)."""


def run_loop(trainer, batches, callbacks, num_steps: int, stopped: bool = False) -> None:
    """Trains until `num_steps` or until a callback stops the stage."""
    try:
        for cb in callbacks:
            cb.on_start(trainer)
        info = None
        while trainer.step < num_steps and not stopped:
            host = next(batches)
            info = StepInfo(trainer.step + 1, num_steps, host, trainer.train(host))
            for cb in callbacks:
                cb.after_step(info)
            stopped = info.stop
        for cb in callbacks:
            cb.on_end(trainer, info)
    finally:
        for cb in callbacks:
            cb.close()


@dataclasses.dataclass
class Record:
    """What a checkpoint's meta carries across restarts: global tokens per domain up to
    the saved step, evaluations, the early-stopping state, wall and compile seconds."""

    tokens: list
    evals: list
    early_stop: dict
    wall_s: float = 0.0  # of earlier attempts
    compile_s: float = 0.0
    started: float = dataclasses.field(default_factory=time.perf_counter)
    compiled_s: float = 0.0  # this attempt

    @classmethod
    def fresh(cls) -> "Record":
        return cls([0] * len(data.DOMAINS), [], EarlyStopRule(0, 0.0).state())

    @classmethod
    def from_meta(cls, meta: dict) -> "Record":
        keys = ("tokens", "evals", "early_stop", "wall_s", "compile_s")
        return cls(**{k: meta[k] for k in keys})

    def timing(self) -> dict:
        return {
            "wall_s": self.wall_s + time.perf_counter() - self.started,
            "compile_s": self.compile_s + self.compiled_s,
        }

    def meta(self) -> dict:
        return {
            "tokens": self.tokens,
            "evals": self.evals,
            "early_stop": self.early_stop,
            **self.timing(),
        }


class NonFinite(FloatingPointError):
    """A non-finite metric; nothing of that step was checkpointed."""


def check_finite(step: int, metrics: dict, last_good: int | None = None) -> None:
    bad = sorted(k for k, v in metrics.items() if not np.isfinite(v))
    if bad:
        kept = "nothing of this step was saved"
        if last_good is not None:
            kept += f"; the last good checkpoint is step {last_good}"
        raise NonFinite(
            f"non-finite {', '.join(f'{k}={metrics[k]}' for k in bad)} at step {step}; {kept}"
        )


class MetricsLog:
    """metrics.jsonl and TensorBoard event files (no TensorFlow needed); process 0 only.

    Lines are kept and the file rewritten whole at each checkpoint (remote stores do
    not append); after a resume, lines and events past the resumed step are dropped, so
    both views hold each step once.
    """

    def __init__(self, run_dir: str, resumed_step: int):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(run_dir, "metrics.jsonl")
        old = epath.Path(self.path)
        lines = old.read_text().splitlines() if self.enabled and old.exists() else []
        self.lines = [x for x in lines if json.loads(x)["step"] <= resumed_step]
        self.writer = None
        if self.enabled:
            self.writer = tensorboard.SummaryWriter(run_dir, start_step=resumed_step)

    def write(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        self.lines.append(json.dumps({"step": step, **scalars}))
        self.writer.write_scalars(step, scalars)

    def write_final(self, step: int, scalars: dict) -> None:
        """The stage's final evaluations: in the event file only (result.json holds them)."""
        if self.enabled:
            self.writer.write_final(step, scalars)

    def flush(self) -> None:
        if self.enabled:
            fileio.write_text(self.path, "".join(x + "\n" for x in self.lines))
            self.writer.flush()

    def close(self) -> None:
        if self.enabled:
            self.writer.close()


class TokenCount(Callback):
    """Target tokens per domain of this process's rows; summed over processes at a sync."""

    def __init__(self, record: Record):
        self.record = record
        self.local = np.zeros(len(data.DOMAINS), np.int64)

    def after_step(self, info: StepInfo) -> None:
        self.local += data.tokens_by_domain(info.host)

    def before_save(self, step: int, metrics: dict | None, log_line: bool) -> None:
        """Sums the counts over processes (a collective: checkpoint steps only)."""
        total = _global_sum(self.local)
        self.record.tokens = (np.asarray(self.record.tokens) + total).tolist()
        self.local[:] = 0


def _global_sum(local: np.ndarray) -> np.ndarray:
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(local)).sum(0)


class Progress(Callback):
    """Training metrics read one step late (no wait on the step just dispatched), checked
    for NaN/Inf, logged with throughput; one progress line per report."""

    def __init__(self, run):
        self.log, self.name, self.plan = run.log, run.name, run.node.plan
        self.flops = cost.flops_per_token(run.node.model, self.plan.seq_len)
        self.peak = run.rt.peak_flops(run.node.model.dtype)
        self.every = run.node.exp.log_every
        self.pending = None
        self.mark = (time.perf_counter(), run.trainer.step)

    def after_step(self, info: StepInfo) -> None:
        self.flush()  # the previous step's metrics, now that this one is dispatched
        if info.step % self.every == 0:
            self.pending = (info.step, info.metrics)

    def before_save(self, step: int, metrics: dict | None, log_line: bool) -> None:
        """Logs the checkpoint step now (a step-scheduled save) or what is pending."""
        if log_line and metrics is not None:
            self.pending = (step, metrics)
        self.flush()

    def flush(self) -> None:
        if self.pending is None:
            return
        step, metrics = self.pending
        self.pending = None
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        check_finite(step, m)
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


class EarlyStopRule:
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


class Validation(Callback):
    """The stage's validation curve `val/<domain>`: every domain every `every` steps (0:
    none) before the last (`finish` evaluates that one). With an early-stopping rule,
    D_post also every `stop_every` steps and at the end: those evaluations are
    checkpointed, the improving ones ranked as best candidates, and the stage stops after
    `patience` evaluations without gain. One evaluation call per step serves both."""

    def __init__(self, run, rule: EarlyStopRule | None = None):
        exp = run.node.exp
        self.evaluate, self.log, self.record = run.losses, run.log, run.record
        self.every = exp.eval_every or exp.ckpt_every
        self.rule, self.stop_every = rule, exp.posttrain.early_stop.every

    def after_step(self, info: StepInfo) -> None:
        last = info.step == info.num_steps
        curve = self.every > 0 and info.step % self.every == 0 and not last
        stopping = self.rule is not None and (info.step % self.stop_every == 0 or last)
        if not (curve or stopping):
            return
        losses = self.evaluate(data.DOMAINS if curve else ("post",))
        scalars = {f"val/{d}": v for d, v in losses.items()}
        check_finite(info.step, scalars)
        self.log.write(info.step, scalars)
        if stopping:
            loss = losses["post"]
            self.record.evals.append([info.step, loss])
            info.stop = self.rule.update(info.step, loss)
            self.record.early_stop = self.rule.state()
            info.checkpoint = True
            info.val_loss = loss if self.rule.best_step == info.step else None


class Profile(Callback):
    """A `jax.profiler` trace of steps `first`..`last` into `log_dir`/plugins/profile/,
    which TensorBoard's profile tab and Perfetto (perfetto_trace.json.gz) read. The trace
    ends once the last step's results exist, so it holds that step's device work."""

    def __init__(self, log_dir: str, first: int, last: int):
        self.log_dir, self.first, self.last = log_dir, first, last
        self.active = False

    def _start(self, next_step: int) -> None:
        if self.first <= next_step <= self.last and not self.active:
            jax.profiler.start_trace(self.log_dir, create_perfetto_trace=True)
            self.active = True

    def on_start(self, trainer) -> None:
        self._start(trainer.step + 1)

    def after_step(self, info: StepInfo) -> None:
        if info.step >= self.last and self.active:
            jax.block_until_ready(info.metrics)
            self.close()
        self._start(info.step + 1)

    def close(self) -> None:
        if self.active:
            self.active = False
            jax.profiler.stop_trace()


class Checkpointing(Callback):
    """Saves every `every` steps, every `every_s` seconds of wall time, at the stage's end
    and when a callback asks; before each save the step's metrics are checked (and logged,
    for step-scheduled saves) and the token counts synced over processes.

    Time-based and preemption saves write no metrics line of their own, so metrics.jsonl
    does not depend on when they happened; under several processes process 0 decides
    time-based saves at log steps and broadcasts the decision (saves are collective)."""

    def __init__(self, run):
        exp = run.node.exp
        self.run, self.mngr = run, run.mngr
        self.every, self.every_s = exp.ckpt_every, 60.0 * exp.ckpt_every_minutes
        self.log_every = exp.log_every
        self.last_save = time.monotonic()

    def after_step(self, info: StepInfo) -> None:
        if info.checkpoint or info.step % self.every == 0 or info.step == info.num_steps:
            self.save(info.step, info.metrics, info.val_loss)
        elif self._time_due(info.step):
            self.save(info.step, info.metrics, log_line=False)

    def _time_due(self, step: int) -> bool:
        if self.every_s <= 0:
            return False
        due = time.monotonic() - self.last_save >= self.every_s
        if jax.process_count() == 1:
            return due
        if step % self.log_every:
            return False
        from jax.experimental import multihost_utils

        return bool(multihost_utils.broadcast_one_to_all(np.asarray(due)))

    def on_end(self, trainer, info: StepInfo | None) -> None:
        if self.mngr.latest_step() != trainer.step:  # no step ran, or resumed at the end
            self.save(trainer.step, info.metrics if info else None)

    def save(self, step: int, metrics: dict | None, val_loss=None, log_line=True) -> None:
        self.run.save(step, metrics, val_loss, log_line)
        self.last_save = time.monotonic()


EXIT_PREEMPTED = 75  # EX_TEMPFAIL: the command can be rerun and will resume


class Preempted(Exception):
    """The stage checkpointed its current step on a preemption notice and stopped."""

    def __init__(self, step: int):
        super().__init__(f"preempted: checkpointed step {step}; rerun the same command to resume")
        self.step = step


class Preemption(Callback):
    """On SIGTERM (or JAX's preemption sync point under several processes), checkpoints the
    step just finished, waits for the save to commit and raises `Preempted`."""

    def __init__(self, run):
        self.run = run
        self.requested = False
        self.previous = None

    def on_start(self, trainer) -> None:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._request)

    def _request(self, signum, frame) -> None:
        logging.warning("SIGTERM: checkpointing at the next step boundary")
        self.requested = True

    def after_step(self, info: StepInfo) -> None:
        if not (self.requested or _sync_point(info.step)):
            return
        mngr = self.run.mngr
        if mngr.latest_step() != info.step:
            self.run.save(info.step, info.metrics, log_line=False)
        mngr.wait_until_finished()
        raise Preempted(info.step)

    def close(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
            self.previous = None


def _sync_point(step: int) -> bool:
    """JAX's preemption notice, agreed by every process (it swallows SIGTERM there)."""
    if jax.process_count() == 1:
        return False
    from jax.experimental import multihost_utils

    try:
        return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # no preemption service in this job
        return False


class RaiseAt(Callback):
    """Raises `error` after step `step`'s other callbacks ran: a job killed there. With
    `times`, only the first `times` stages that reach the step raise."""

    def __init__(self, step: int, error: BaseException, times: int | None = None):
        self.step, self.error, self.times = step, error, times

    def after_step(self, info: StepInfo) -> None:
        if info.step == self.step and (self.times is None or self.times > 0):
            if self.times is not None:
                self.times -= 1
            raise self.error


class OnStart(Callback):
    """Calls `fn(trainer)` before the first step (a test's view of the start state)."""

    def __init__(self, fn):
        self.fn = fn

    def on_start(self, trainer) -> None:
        self.fn(trainer)
