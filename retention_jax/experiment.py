"""Runs the experiment graph (`graph.py` expands it): each node under its run-directory
lock, with failure containment, then the results rows.

`run` is where the process's `Runtime` is created and where the nodes' data are
prepared; the graph's nodes arrive resolved (typed config, model, plan), validated
before anything is prepared or compiled. A finished node (its `result.json` exists) is
never run again; a node that raises is recorded and the graph goes on without its
descendants.
"""

import dataclasses
import errno
import json
import os
import time
import traceback
from collections.abc import Iterable, Sequence

import jax
import ml_collections as mlc
from etils import epath
from jax.experimental import multihost_utils

from retention_jax import callbacks as cb
from retention_jax import (
    config,
    data,
    errors,
    fileio,
    forecast,
    graph,
    lock,
    preflight,
    results,
    stage,
)
from retention_jax import model as model_lib
from retention_jax import runtime as runtime_lib
from retention_jax.data import check
from retention_jax.graph import Node

RESULTS = "results.jsonl"
FAILED = "failed.json"
CHECKPOINTS_KEPT = 2  # per run: the latest and the one before it (or the best step)
EXIT_DISK_FULL = 74  # EX_IOERR: free space, then the same command resumes


class DiskFull(RuntimeError):
    """The work directory ran out of space: the graph stops (every node would fail)."""


def _disk_full(error: BaseException) -> bool:
    """Whether `error`, or an error it was raised from, is ENOSPC / EDQUOT."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(error):  # wrapped by a C++ writer
            return True
        error = error.__cause__ or error.__context__
    return False


class GraphFailed(RuntimeError):
    """Some nodes failed (each recorded in its run directory's failed.json); the nodes
    that did not depend on them finished. `rows` are the finished leaves."""

    def __init__(self, failures: dict[str, str], rows: list[dict]):
        lines = "\n".join(f"  {i}: {why}" for i, why in failures.items())
        super().__init__(
            f"{len(failures)} node(s) did not finish:\n{lines}\n"
            "Fix the cause, then rerun with --retry_failed (finished nodes are kept)."
        )
        self.failures, self.rows = failures, rows


class GraphProgress:
    """One line per node: k of N, its stage, time so far and the graph's ETA, from the
    tokens per second the nodes of this run have trained at (compiles included)."""

    def __init__(self, nodes: list[Node]):
        self.tokens = {n.id: sum(n.plan.tokens.values()) for n in nodes}
        self.total, self.k, self.done = len(nodes), 0, 0
        self.start = time.perf_counter()

    def begin(self, node: Node) -> None:
        self.k += 1
        elapsed = time.perf_counter() - self.start
        left = sum(self.tokens.values())
        eta = f"{left * elapsed / self.done:,.0f}s" if self.done else "?"
        if jax.process_index() == 0:
            print(
                f"[{self.k}/{self.total}] {node.id} ({node.stage}): elapsed "
                f"{elapsed:,.0f}s, graph ETA {eta}",
                flush=True,
            )

    def end(self, node: Node) -> None:
        self.done += self.tokens.pop(node.id)

    def skip(self, node: Node) -> None:
        self.tokens.pop(node.id)


def devices_for(cfg: mlc.ConfigDict, devices: int | None = None) -> int:
    """Devices a config is validated against: `devices`, else this host's when the mesh
    fits them, else the fewest the mesh accepts (a pod's plan inspected on a laptop)."""
    if devices:
        return devices
    try:
        config.mesh_shape(cfg.mesh, jax.device_count())
        return jax.device_count()
    except errors.ConfigError:
        return config.smallest_devices(cfg.mesh)


def expand(cfg: mlc.ConfigDict, devices: int | None = None) -> list[Node]:
    """`graph.expand` for this job: validated against `devices_for(cfg, devices)` and
    this job's processes."""
    return graph.expand(cfg, devices_for(cfg, devices), jax.process_count())


def _check_identity(run_dir: str, record: dict) -> None:
    """Refuses a run directory written under a different config; names the keys."""
    path = os.path.join(run_dir, "config.json")
    record = fileio.as_stored(record)
    old = fileio.read_json(path)
    if old is None:
        if jax.process_index() == 0:
            fileio.write_json(path, record)
        return
    diff = sorted(_diff(old, record))
    if diff:
        raise ValueError(
            f"{run_dir} holds a run with a different config (keys: {', '.join(diff)}); "
            "refusing to overwrite it. Use another --workdir or remove that directory."
        )


def _diff(a, b, prefix: str = "") -> Iterable[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            yield from _diff(a.get(k), b.get(k), f"{prefix}{k}.")
    elif a != b:
        yield prefix.rstrip(".")


def step_memory(node: Node, params: int) -> dict[str, int]:
    """preflight.step_memory of the node's training step on its mesh (`params`: its
    model's count)."""
    mesh = node.exp.mesh
    rows = node.plan.batch // (mesh["data"] * mesh["fsdp"]) // node.optimizer.microbatches
    shards = mesh["fsdp"] * mesh["tensor"]
    return preflight.step_memory(node.model, params, max(rows, 1), node.plan.seq_len, shards)


def _largest_steps(nodes: list[Node]) -> list[tuple[Node, dict[str, int]]]:
    """Per stage, the node whose step needs the most memory, with its estimate."""
    counts = {}  # a graph's nodes share a few models: count each once
    worst = {}
    for n in nodes:
        if n.model not in counts:
            counts[n.model] = model_lib.count_params(n.model)
        need = step_memory(n, counts[n.model])
        if n.stage not in worst or sum(need.values()) > sum(worst[n.stage][1].values()):
            worst[n.stage] = (n, need)
    return list(worst.values())


def _memory_knobs(stage_name: str) -> str:
    return (
        f"{stage_name}.microbatch_rows (or .microbatches), model.remat, model.loss_chunk, mesh.fsdp"
    )


def _by_data(nodes: list[Node]) -> dict[str, list[Node]]:
    """The nodes grouped by the stores they read (their data config)."""
    groups: dict[str, list[Node]] = {}
    for n in nodes:
        groups.setdefault(n.data_key, []).append(n)
    return groups


def _open_data(nodes: list[Node]) -> list[str]:
    """Opens every source and tokenizer the nodes read (none tokenized): a bad local path
    fails the dry run; returns a line per hub id this machine could not reach."""
    configs = [group[0].exp.data for group in _by_data(nodes).values()]
    lines = [line for d in configs for line in check.open_all(d)]
    return [f"data: {len(configs)} data config(s) opened"] + sorted(set(lines))


def prepare(nodes: list[Node], workdir: str) -> list[data.Corpus]:
    """The prepare step: every store the nodes read, filled and verified (checksums).

    Needs no devices. On a slice every host may run it: shard commits are idempotent,
    so concurrent preparers of one store race harmlessly and all end with it full."""
    out = []
    for group in _by_data(nodes).values():
        needs = data.needs_of([m.plan for m in group])
        corpus = data.prepare(group[0].exp.data, workdir, needs, verify=True)
        for d, st in corpus.stores.items():
            m = st.manifest
            print(
                f"data.{d}: {st.path}: {m['train']['sequences']:,} train sequences in "
                f"{m['train']['shards']} shards, {st.num_sequences['val']:,} validation",
                flush=True,
            )
        out.append(corpus)
    return out


def dry_run(cfg: mlc.ConfigDict, *, only: str = "", devices: int | None = None) -> None:
    """Validates the graph against `devices` (or the config's own mesh) and prints the
    plan, the largest step's memory per stage and the data it opens; runs nothing."""
    if devices is not None and (isinstance(devices, bool) or devices < 1):
        raise errors.UserError(f"--devices={devices}: a positive number of devices")
    todo = graph.to_run(expand(cfg, devices), only)
    print(graph.plan_table(todo))
    for n, need in _largest_steps(todo):
        parts = ", ".join(f"{k} {v / 2**30:.3f}" for k, v in need.items())
        print(
            f"memory per device, {n.stage} step (estimate): {sum(need.values()) / 2**30:.3f} "
            f"GiB ({parts} GiB)"
        )
    for line in _open_data(todo):
        print(line)


@dataclasses.dataclass
class _Wave:
    """What every node of one pass over the graph shares: where runs live, the runtime,
    the prepared data (one corpus per data config) and the failures so far."""

    workdir: str
    rt: runtime_lib.Runtime
    pending: list[Node]  # the nodes this pass runs: every corpus is sized for all of them
    extra_callbacks: Sequence[cb.Callback]
    retry_failed: bool
    corpora: dict = dataclasses.field(default_factory=dict)
    failures: dict = dataclasses.field(default_factory=dict)

    def run_dir(self, node: Node) -> str:
        return os.path.join(self.workdir, "runs", node.id)


def run(
    cfg: mlc.ConfigDict,
    workdir: str,
    *,
    only: str = "",
    rt: runtime_lib.Runtime | None = None,
    extra_callbacks: Sequence[cb.Callback] = (),
    retry_failed: bool = False,
) -> list[dict]:
    """Runs the graph (or the nodes `only` selects; `--only=prepare` prepares its data)
    and writes `<workdir>/results.jsonl`; returns the rows of every finished leaf.

    `rt` is the process's runtime (created here when not given); `extra_callbacks` go to
    every stage that runs. A node that raises is recorded in its `failed.json` and the
    graph goes on with every node that does not depend on it; then `GraphFailed` is
    raised. A node that failed before is not rerun unless `retry_failed`. Preemption and
    kills are not failures.
    """
    if "://" not in workdir:
        workdir = os.path.abspath(workdir)  # Orbax writes to absolute paths only
    if only == graph.FORECAST:
        cfg = mlc.ConfigDict(cfg.to_dict())
        cfg.forecast.probes = True
    if only == graph.PREPARE:  # needs none of the config's devices
        prepare(expand(cfg), workdir)
        return []
    nodes = expand(cfg, jax.device_count())
    todo = graph.to_run(nodes, only)
    rt = rt or runtime_lib.Runtime.create(nodes[0].exp.mesh, nodes[0].exp.rules)
    wave = _Wave(workdir, rt, [], extra_callbacks, retry_failed)
    wave.pending = [n for n in todo if stage.read_result(wave.run_dir(n)) is None]
    _preflight(wave)
    progress = GraphProgress(wave.pending)
    pending = {n.id for n in wave.pending}
    for n in todo:
        if n.id in pending:
            _run_one(wave, n, progress)
        else:
            print(f"{n.id} already done", flush=True)
    rows = collect(workdir, nodes)
    if only == graph.FORECAST and jax.process_index() == 0:
        posts = [n for n in todo if n.stage == "posttrain"]
        print(forecast.ranking({n.id: stage.read_result(wave.run_dir(n)) for n in posts}))
    if wave.failures:
        raise GraphFailed(wave.failures, rows)
    return rows


def _preflight(wave: _Wave) -> None:
    """Memory, a writable work directory and its free space, before any tokenization or
    compile."""
    if not wave.pending:
        return
    params = max(model_lib.count_params(m) for m in {n.exp.model for n in wave.pending})
    for n, need in _largest_steps(wave.pending):
        preflight.check_memory(need, f"{n.stage} node {n.id}", _memory_knobs(n.stage))
    preflight.check(wave.workdir, params=params, keep=CHECKPOINTS_KEPT, nodes=len(wave.pending))


def _run_one(wave: _Wave, n: Node, progress: GraphProgress) -> None:
    """Runs node `n` unless it is blocked; a failure is recorded in `wave.failures`."""
    why = _blocked(n, wave)
    if why is not None:
        wave.failures[n.id] = why
        progress.skip(n)
        return
    progress.begin(n)
    try:  # bad data fails the nodes that read it; the rest of the graph runs
        corpus = _corpus(wave, n)
    except Exception as e:
        if _disk_full(e):
            raise DiskFull(f"the work directory is full while preparing data: {e}") from e
        wave.failures[n.id] = _record_failure(wave.run_dir(n), n, e)
        progress.end(n)
        return
    _check_identity(
        wave.run_dir(n), {"identity": n.identity, "data_fingerprint": corpus.fingerprint}
    )
    why = _run_node(wave, n, corpus)
    if why is not None:
        wave.failures[n.id] = why
    progress.end(n)


def _corpus(wave: _Wave, node: Node) -> data.Corpus:
    """The node's prepared data, sized for every pending node that shares its data config;
    checked against the model's vocabulary before anything compiles. With a local work
    directory the run prepares what is missing (each process of a multi-process run
    may: shard commits are idempotent); with a remote one (gs://) it opens the stores
    that the prepare step (`--only=prepare`) made."""
    key = node.data_key
    if key not in wave.corpora:
        needs = data.needs_of([m.plan for m in wave.pending if m.data_key == key])
        local = "://" not in wave.workdir
        try:
            wave.corpora[key] = data.prepare(node.exp.data, wave.workdir, needs, build=local)
        except Exception as e:  # every node reading these stores fails the same way
            wave.corpora[key] = e
    corpus = wave.corpora[key]
    if isinstance(corpus, Exception):
        raise corpus
    if corpus.vocab_size > node.model.vocab_size:
        errors.fail(
            "model.vocab_size",
            node.model.vocab_size,
            f"at least the {corpus.vocab_size} tokens of "
            f"data.tokenizer={node.exp.data.tokenizer!r}",
        )
    return corpus


def _blocked(node: Node, wave: _Wave) -> str | None:
    """Why `node` does not run now: its parent did not finish, or it failed before."""
    if node.parent is not None and node.parent.id in wave.failures:
        return f"skipped: parent {node.parent.id} did not finish"
    earlier = fileio.read_json(os.path.join(wave.run_dir(node), FAILED))
    if earlier is not None and not wave.retry_failed:
        return f"failed before ({earlier['error']}); not retried"
    return None


def _parent(wave: _Wave, n: Node, corpus: data.Corpus) -> tuple[str, int] | None:
    """(the parent's run directory, its result step) for a branch; ValueError when the
    parent trained on another version of the data."""
    if n.parent is None:
        return None
    parent_dir = wave.run_dir(n.parent)
    pr = stage.read_result(parent_dir)
    if pr is None:
        raise RuntimeError(f"{n.id}: parent {n.parent.id} has not finished; run it first")
    theirs = (fileio.read_json(os.path.join(parent_dir, "config.json")) or {}).get(
        "data_fingerprint"
    )
    if theirs is not None and theirs != corpus.fingerprint:
        raise ValueError(
            f"parent {n.parent.id} trained on data {theirs}, this node reads data "
            f"{corpus.fingerprint} (a store's source or tokenizer changed in between); "
            "refusing to branch across data versions. Rerun the parent or restore its data."
        )
    return parent_dir, pr["result_step"]


def _run_node(wave: _Wave, n: Node, corpus: data.Corpus) -> str | None:
    """Runs one node under its run-directory lock; returns why it did not finish, if so.

    A node held by another job is left to it; a node that raises is recorded in its
    failed.json (preemption propagates: the rerun resumes)."""
    run_dir = wave.run_dir(n)
    try:
        parent = _parent(wave, n, corpus)
    except ValueError as e:
        return _record_failure(run_dir, n, e)
    try:
        held = lock.acquire_for_job(run_dir)
    except lock.RunLocked as e:  # another job runs this node: leave it to that job
        print(f"{n.id} skipped: {e}", flush=True)
        return str(e)
    try:
        if held is not None:
            held.start_heartbeat()
        result = stage.run(n, run_dir, corpus, wave.rt, parent, wave.extra_callbacks)
    except cb.Preempted:
        raise
    except Exception as e:  # contained: recorded, the graph goes on
        if _disk_full(e):
            steps = _committed_steps(run_dir)
            raise DiskFull(
                f"the work directory is full ({type(e).__name__}: {e}) while {n.id} ran; "
                f"its last committed checkpoint is step {steps[-1] if steps else None}. "
                "Free space (or move --workdir), then rerun the same command: it resumes."
            ) from e
        return _record_failure(run_dir, n, e)
    finally:
        if held is not None:
            held.release()
        if jax.process_count() > 1:  # children read result.json that process 0 wrote
            multihost_utils.sync_global_devices(f"node {n.id}")
    if jax.process_index() == 0:
        epath.Path(run_dir, FAILED).unlink(missing_ok=True)
        val = " ".join(f"{d} {v:.4f}" for d, v in result["val"].items())
        print(f"{n.id} done: val {val}", flush=True)
    return None


def _committed_steps(run_dir: str) -> list[int]:
    """Checkpoint steps of a run (a step being saved is a tmp directory, not counted)."""
    return sorted(int(p.name) for p in epath.Path(run_dir, "ckpt").glob("*") if p.name.isdigit())


def _record_failure(run_dir: str, node: Node, error: Exception) -> str:
    """Writes failed.json (error, traceback, last checkpoint) and returns a one-line reason."""
    steps = _committed_steps(run_dir)
    why = f"{type(error).__name__}: {error}"
    record = {
        "id": node.id,
        "stage": node.stage,
        "error": why,
        "traceback": traceback.format_exception(error)[-12:],
        "last_checkpoint_step": steps[-1] if steps else None,
    }
    if jax.process_index() == 0:
        fileio.write_json(os.path.join(run_dir, FAILED), record)
        print(f"{node.id} FAILED: {why}", flush=True)
    return why


def collect(workdir: str, nodes: list[Node]) -> list[dict]:
    """Rows of every finished leaf, written to results.jsonl (process 0, atomically)."""
    finished = {n.id: stage.read_result(os.path.join(workdir, "runs", n.id)) for n in nodes}
    rows = []
    for leaf in nodes:
        lineage = leaf.lineage()
        if leaf.stage != "finetune" or not all(finished[n.id] for n in lineage):
            continue
        ids = {n.stage: n.id for n in lineage}
        swept = {k: v for n in lineage for k, v in n.swept.items()}
        by_stage = {n.stage: finished[n.id] for n in lineage}
        params = model_lib.count_params(leaf.exp.model)
        row = results.row(ids, leaf.exp, swept, by_stage, params, leaf.replicate)
        rows.append({**row, "forecast": by_stage["posttrain"].get("forecast")})
    if jax.process_index() == 0:
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
        fileio.write_text(os.path.join(workdir, RESULTS), text)
    return rows
