"""The experiment graph: pretraining nodes feed post-training nodes feed fine-tuning leaves.

`cfg.sweep.<stage>` pairs dotted config paths (from the root: "pretrain.exposure.lam",
"posttrain.lr", "seed", "data.post_pool_tokens") with tuples of values; each stage's nodes
are the product of its sweep, under every node of the stage before. A node's id is a
digest of the config that decides its result (seed, model, data, its stage's section)
and its parent's id, so one pretraining run feeds every branch below it and a finished
node (its `result.json` exists) is never run again.

`run` is the one place where configs become typed (`config.parse`, every node validated
before anything is prepared or compiled) and where the process's `Runtime` is created.
"""

import dataclasses
import errno
import itertools
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
    lock,
    perf,
    preflight,
    results,
    stage,
)
from retention_jax import model as model_lib
from retention_jax import runtime as runtime_lib
from retention_jax.data import check

# Data keys that change where or how fast data is read, not which tokens: not identity.
DATA_NOT_IDENTITY = ("workers", "read_threads", "cache_dir")
RESULTS = "results.jsonl"
PREPARE = "prepare"  # --only=prepare: the data wave
FORECAST = "forecast"  # --only=forecast: stages 1 and 2 with the probes, then a ranking
FAILED = "failed.json"
PLAN_DEVICE, PLAN_MFU = "H100", 0.4  # the dry run's device-hours estimate (a stated rate)
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


@dataclasses.dataclass(frozen=True)
class Node:
    id: str
    stage: str
    cfg: mlc.ConfigDict  # the node's config as files spell it (its sweep values assigned)
    exp: config.Experiment  # the same, typed and validated
    parent: "Node | None"
    swept: dict
    replicate: int = 0  # which copy of the graph (config.replicate); its children share it

    @property
    def identity(self) -> dict:
        data_cfg = dataclasses.asdict(self.exp.data)
        return {
            "stage": self.stage,
            "seed": self.exp.seed,
            "model": dataclasses.asdict(self.exp.model_for(self.stage)),
            "data": {k: v for k, v in data_cfg.items() if k not in DATA_NOT_IDENTITY},
            self.stage: _flat_section(self.exp.stage(self.stage)),
            "parent": self.parent.id if self.parent else None,
        }

    def lineage(self) -> list["Node"]:
        return ([*self.parent.lineage()] if self.parent else []) + [self]


def _flat_section(section) -> dict:
    """A stage section as its config file spells it (optimizer keys at the top level)."""
    d = dataclasses.asdict(section)
    return {**{k: v for k, v in d.items() if k != "optimizer"}, **d["optimizer"]}


def _product(sweep: tuple) -> Iterable[dict]:
    """{path: value} per point of the sweep; linked paths take their values together."""
    for point in itertools.product(*(values for _, values in sweep)):
        out = {}
        for (path, _), value in zip(sweep, point):
            linked = isinstance(path, tuple | list)
            out.update(zip(path, value) if linked else [(path, value)])
        yield out


def devices_for(cfg: mlc.ConfigDict, devices: int | None = None) -> int:
    """Devices a config is validated against: `devices`, else this host's when the mesh
    fits them, else the fewest the mesh accepts (a pod's plan inspected on a laptop)."""
    if devices:
        return devices
    try:
        config.mesh_shape(cfg.mesh, jax.device_count())
        return jax.device_count()
    except config.ConfigError:
        return config.smallest_devices(cfg.mesh)


def expand(cfg: mlc.ConfigDict, num_devices: int | None = None) -> list[Node]:
    """Every node of the graph, each validated and typed, stage by stage (parents before
    children); within a stage, replicate 0's nodes, then replicate 1's, ..."""
    config.check_sweep(cfg)
    count, _ = config.replicates(cfg)
    n = num_devices or devices_for(cfg)
    nodes = []
    for r in range(count):
        frontier = [None]
        root = config.replicate(cfg, r)
        for name in config.STAGES:
            layer = []
            for parent in frontier:
                for values in _product(cfg.sweep[name]):
                    c = mlc.ConfigDict((parent.cfg if parent else root).to_dict())
                    for path, value in values.items():
                        config.assign(c, path, value)
                    exp = config.parse(c, n, jax.process_count())
                    p = data.plan(name, exp)
                    config.check_schedule(
                        name, exp.stage(name).optimizer, p.num_steps, p.batch * p.seq_len
                    )
                    probe = Node("", name, c, exp, parent, values, r)
                    node_id = f"{name}-{fileio.digest(probe.identity)}"
                    layer.append(Node(node_id, name, c, exp, parent, values, r))
            nodes += layer
            frontier = layer
    return sorted(nodes, key=lambda node: config.STAGES.index(node.stage))  # stable


def select(nodes: list[Node], selector: str) -> list[Node]:
    """Nodes whose id starts with, or whose stage equals, one of the comma-separated terms."""
    terms = [t for t in selector.split(",") if t]
    chosen = [n for n in nodes if any(n.id.startswith(t) or n.stage == t for t in terms)]
    if not chosen:
        raise errors.UserError(
            f"--only={selector}: matches no node; allowed: comma-separated stages "
            f"({', '.join(config.STAGES)}), '{PREPARE}', '{FORECAST}', or prefixes of the "
            f"{len(nodes)} node ids (e.g. {nodes[0].id}; --dry_run lists them all)"
        )
    return chosen


def plan_table(nodes: list[Node]) -> str:
    """The dry-run view: nodes, parents, steps, warmup and microbatches a step, tokens per
    domain, FLOPs."""
    lines = [
        f"{'node':<22} {'parent':<22} {'rep':>3} {'steps':>7} {'warmup':>7} {'micro':>5} "
        + " ".join(f"{d + '_tokens':>12}" for d in data.DOMAINS)
        + f" {'PFLOP':>9}  swept"
    ]
    total = 0.0
    for n in nodes:
        p = data.plan(n.stage, n.exp)
        opt = n.exp.stage(n.stage).optimizer
        sched = opt.schedule(p.num_steps, p.batch * p.seq_len)
        warmup = f"{sched['warmup_steps']}{'' if sched['warmup_steps'] < p.num_steps else '!'}"
        flops = model_lib.flops_per_token(n.exp.model, p.seq_len) * sum(p.tokens.values())
        total += flops
        lines.append(
            f"{n.id:<22} {(n.parent.id if n.parent else '-'):<22} {n.replicate:>3} "
            f"{p.num_steps:>7} {warmup:>7} "
            f"{opt.microbatches:>5} "
            + " ".join(f"{p.tokens.get(d, 0):>12,}" for d in data.DOMAINS)
            + f" {flops / 1e15:>9.4f}  {json.dumps(n.swept)}"
        )
    lines.append(f"{len(nodes)} nodes, {total / 1e15:.4f} PFLOP of training in total")
    hours = total / (PLAN_MFU * perf.PEAK_BF16[PLAN_DEVICE]) / 3600
    lines.append(
        f"≈ {hours:,.1f} device-hours on {PLAN_DEVICE} at {PLAN_MFU:.0%} MFU of its "
        f"{perf.PEAK_BF16[PLAN_DEVICE] / 1e12:,.0f} TFLOP/s bf16 peak (training only)"
    )
    copies = len({n.replicate for n in nodes})
    if copies > 1:
        lines.append(
            f"{copies} replicates (column rep): per replicate {len(nodes) / copies:g} nodes, "
            f"{total / copies / 1e15:.4f} PFLOP, ≈ {hours / copies:,.1f} device-hours"
        )
    lines.append("warmup marked '!': it spans the whole stage, so the peak LR is never reached")
    if nodes:
        mesh = nodes[0].exp.mesh
        lines.append(
            f"micro: gradient-accumulation steps with the batch split over data×fsdp = "
            f"{mesh['data']}×{mesh['fsdp']} devices (this mesh; microbatch_rows resolve per mesh)"
        )
    return "\n".join(lines)


class GraphProgress:
    """One line per node: k of N, its stage, time so far and the graph's ETA, from the
    tokens per second the nodes of this run have trained at (compiles included)."""

    def __init__(self, nodes: list[Node]):
        self.tokens = {n.id: sum(data.plan(n.stage, n.exp).tokens.values()) for n in nodes}
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


def _check_identity(run_dir: str, record: dict) -> None:
    """Refuses a run directory written under a different config; names the keys."""
    path = os.path.join(run_dir, "config.json")
    record = json.loads(json.dumps(record, default=str))  # tuples -> lists, as stored
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


def _data_key(exp: config.Experiment) -> str:
    return json.dumps(dataclasses.asdict(exp.data), sort_keys=True, default=str)


def _corpus(node: Node, pending: list[Node], workdir: str, cache: dict) -> data.Corpus:
    """The node's prepared data, sized for every pending node that shares its data config;
    checked against the model's vocabulary before anything compiles. With a local work
    directory the run prepares what is missing (each process of a multi-process run
    may: shard commits are idempotent); with a remote one (gs://) it opens the stores
    that the prepare step (`--only=prepare`) made."""
    key = _data_key(node.exp)
    if key not in cache:
        plans = [data.plan(m.stage, m.exp) for m in pending if _data_key(m.exp) == key]
        local = "://" not in workdir
        try:
            cache[key] = data.prepare(node.exp.data, workdir, data.needs_of(plans), build=local)
        except Exception as e:  # every node reading these stores fails the same way
            cache[key] = e
    corpus = cache[key]
    if isinstance(corpus, Exception):
        raise corpus
    if corpus.vocab_size > node.exp.model.vocab_size:
        config.fail(
            "model.vocab_size",
            node.exp.model.vocab_size,
            f"at least the {corpus.vocab_size} tokens of "
            f"data.tokenizer={node.exp.data.tokenizer!r}",
        )
    return corpus


def step_memory(node: Node, params: int) -> dict[str, int]:
    """preflight.step_memory of the node's training step on its mesh (`params`: its
    model's count)."""
    mesh, section = node.exp.mesh, node.exp.stage(node.stage)
    rows = section.batch // (mesh["data"] * mesh["fsdp"]) // section.optimizer.microbatches
    shards = mesh["fsdp"] * mesh["tensor"]
    model = node.exp.model_for(node.stage)
    return preflight.step_memory(model, params, max(rows, 1), node.exp.data.seq_len, shards)


def _largest_steps(nodes: list[Node]) -> list[tuple[Node, dict[str, int]]]:
    """Per stage, the node whose step needs the most memory, with its estimate."""
    counts = {}  # a graph's nodes share a few models: count each once
    worst = {}
    for n in nodes:
        model = n.exp.model_for(n.stage)
        if model not in counts:
            counts[model] = model_lib.count_params(model)
        need = step_memory(n, counts[model])
        if n.stage not in worst or sum(need.values()) > sum(worst[n.stage][1].values()):
            worst[n.stage] = (n, need)
    return list(worst.values())


def _memory_knobs(stage_name: str) -> str:
    return (
        f"{stage_name}.microbatch_rows (or .microbatches), model.remat, model.loss_chunk, mesh.fsdp"
    )


def _open_data(nodes: list[Node]) -> list[str]:
    """Opens every source and tokenizer the nodes read (none tokenized): a bad local path
    fails the dry run; returns a line per hub id this machine could not reach."""
    configs = {_data_key(n.exp): n.exp.data for n in nodes}
    lines = [line for d in configs.values() for line in check.open_all(d)]
    return [f"data: {len(configs)} data config(s) opened"] + sorted(set(lines))


def prepare(nodes: list[Node], workdir: str) -> list[data.Corpus]:
    """The prepare step: every store the nodes read, filled and verified (checksums).

    Needs no devices. On a slice every host may run it: shard commits are idempotent,
    so concurrent preparers of one store race harmlessly and all end with it full."""
    by_key: dict[str, list[Node]] = {}
    for n in nodes:
        by_key.setdefault(_data_key(n.exp), []).append(n)
    out = []
    for group in by_key.values():
        plans = [data.plan(m.stage, m.exp) for m in group]
        corpus = data.prepare(group[0].exp.data, workdir, data.needs_of(plans), verify=True)
        for d, st in corpus.stores.items():
            m = st.manifest
            print(
                f"data.{d}: {st.path}: {m['train']['sequences']:,} train sequences in "
                f"{m['train']['shards']} shards, {st.num_sequences['val']:,} validation",
                flush=True,
            )
        out.append(corpus)
    return out


def run(
    cfg: mlc.ConfigDict,
    workdir: str,
    *,
    dry_run: bool = False,
    only: str = "",
    devices: int | None = None,
    rt: runtime_lib.Runtime | None = None,
    extra_callbacks: Sequence[cb.Callback] = (),
    retry_failed: bool = False,
) -> list[dict]:
    """Runs the graph (or the nodes `only` selects) and writes `<workdir>/results.jsonl`.

    Returns the rows of every finished leaf. A dry run validates against `devices` (or
    the config's own mesh) and prints the plan; `rt` is the process's runtime (created
    here when not given); `extra_callbacks` go to every stage that runs.

    A node that raises is recorded in its `failed.json` and the graph goes on with every
    node that does not depend on it; then `GraphFailed` is raised. A node that failed
    before is not rerun unless `retry_failed`. Preemption and kills are not failures.
    """
    if devices is not None and (isinstance(devices, bool) or devices < 1):
        raise errors.UserError(f"--devices={devices}: a positive number of devices")
    if "://" not in workdir:
        workdir = os.path.abspath(workdir)  # Orbax writes to absolute paths only
    prep_or_dry = dry_run or only == PREPARE  # neither needs the config's devices here
    if only == FORECAST:
        cfg = mlc.ConfigDict(cfg.to_dict())
        cfg.forecast.probes = True
    nodes = expand(cfg, devices_for(cfg, devices) if prep_or_dry else jax.device_count())
    if only == PREPARE and not dry_run:
        prepare(nodes, workdir)
        return []
    todo = select(nodes, only) if only and only not in (PREPARE, FORECAST) else nodes
    if only == FORECAST:
        todo = [n for n in nodes if n.stage != "finetune"]
    if dry_run:
        print(plan_table(todo))
        for n, need in _largest_steps(todo):
            parts = ", ".join(f"{k} {v / 2**30:.3f}" for k, v in need.items())
            print(
                f"memory per device, {n.stage} step (estimate): {sum(need.values()) / 2**30:.3f} "
                f"GiB ({parts} GiB)"
            )
        for line in _open_data(todo):
            print(line)
        return []
    rt = rt or runtime_lib.Runtime.create(nodes[0].exp.mesh, nodes[0].exp.rules)
    runs = {n.id: os.path.join(workdir, "runs", n.id) for n in nodes}
    pending = [n for n in todo if stage.read_result(runs[n.id]) is None]
    if pending:  # before any tokenization or compile
        params = max(model_lib.count_params(m) for m in {n.exp.model for n in pending})
        for n, need in _largest_steps(pending):
            preflight.check_memory(need, f"{n.stage} node {n.id}", _memory_knobs(n.stage))
        preflight.check(workdir, params=params, keep=CHECKPOINTS_KEPT, nodes=len(pending))
    pending_ids = {n.id for n in pending}
    corpora: dict[str, data.Corpus] = {}
    failures: dict[str, str] = {}
    progress = GraphProgress(pending)
    for n in todo:
        if n.id not in pending_ids:
            print(f"{n.id} already done", flush=True)
            continue
        why = _blocked(n, runs[n.id], failures, retry_failed)
        if why is not None:
            failures[n.id] = why
            progress.skip(n)
            continue
        progress.begin(n)
        try:  # bad data fails the nodes that read it; the rest of the graph runs
            corpus = _corpus(n, pending, workdir, corpora)
        except Exception as e:
            if _disk_full(e):
                raise DiskFull(f"the work directory is full while preparing data: {e}") from e
            failures[n.id] = _record_failure(runs[n.id], n, e)
            progress.end(n)
            continue
        _check_identity(
            runs[n.id], {"identity": n.identity, "data_fingerprint": corpus.fingerprint}
        )
        why = _run_node(n, runs, corpus, rt, extra_callbacks)
        if why is not None:
            failures[n.id] = why
        progress.end(n)
    rows = collect(workdir, nodes)
    if only == FORECAST and jax.process_index() == 0:
        posts = [n for n in todo if n.stage == "posttrain"]
        print(forecast.ranking({n.id: stage.read_result(runs[n.id]) for n in posts}))
    if failures:
        raise GraphFailed(failures, rows)
    return rows


def _blocked(node: Node, run_dir: str, failures: dict, retry_failed: bool) -> str | None:
    """Why `node` does not run now: its parent did not finish, or it failed before."""
    if node.parent is not None and node.parent.id in failures:
        return f"skipped: parent {node.parent.id} did not finish"
    earlier = fileio.read_json(os.path.join(run_dir, FAILED))
    if earlier is not None and not retry_failed:
        return f"failed before ({earlier['error']}); not retried"
    return None


def _run_node(n: Node, runs: dict, corpus, rt, extra_callbacks) -> str | None:
    """Runs one node under its run-directory lock; returns why it did not finish, if so.

    A node held by another job is left to it; a node that raises is recorded in its
    failed.json (preemption propagates: the rerun resumes)."""
    parent = None
    if n.parent is not None:
        pr = stage.read_result(runs[n.parent.id])
        if pr is None:
            raise RuntimeError(f"{n.id}: parent {n.parent.id} has not finished; run it first")
        parent = (runs[n.parent.id], pr["result_step"])
        theirs = (fileio.read_json(os.path.join(runs[n.parent.id], "config.json")) or {}).get(
            "data_fingerprint"
        )
        if theirs is not None and theirs != corpus.fingerprint:
            return _record_failure(
                runs[n.id],
                n,
                ValueError(
                    f"parent {n.parent.id} trained on data {theirs}, this node reads data "
                    f"{corpus.fingerprint} (a store's source or tokenizer changed in between); "
                    "refusing to branch across data versions. Rerun the parent or restore "
                    "its data."
                ),
            )
    meta = {
        "id": n.id,
        "parent": n.parent.id if n.parent else None,
        "parent_step": parent[1] if parent else None,
        "swept": n.swept,
    }
    try:
        held = lock.acquire_for_job(runs[n.id])
    except lock.RunLocked as e:  # another job runs this node: leave it to that job
        print(f"{n.id} skipped: {e}", flush=True)
        return str(e)
    try:
        if held is not None:
            held.start_heartbeat()
        result = stage.run(n.stage, n.exp, runs[n.id], corpus, rt, parent, meta, extra_callbacks)
    except cb.Preempted:
        raise
    except Exception as e:  # contained: recorded, the graph goes on
        if _disk_full(e):
            steps = _committed_steps(runs[n.id])
            raise DiskFull(
                f"the work directory is full ({type(e).__name__}: {e}) while {n.id} ran; "
                f"its last committed checkpoint is step {steps[-1] if steps else None}. "
                "Free space (or move --workdir), then rerun the same command: it resumes."
            ) from e
        return _record_failure(runs[n.id], n, e)
    finally:
        if held is not None:
            held.release()
        if jax.process_count() > 1:  # children read result.json that process 0 wrote
            multihost_utils.sync_global_devices(f"node {n.id}")
    if jax.process_index() == 0:
        epath.Path(runs[n.id], FAILED).unlink(missing_ok=True)
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
