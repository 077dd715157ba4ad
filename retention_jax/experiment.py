"""The experiment graph: pretraining nodes feed post-training nodes feed fine-tuning leaves.

`cfg.sweep.<stage>` pairs dotted config paths (from the root: "pretrain.exposure.lam",
"posttrain.lr", "seed", "data.post_pool_tokens") with tuples of values; each stage's nodes
are the product of its sweep, under every node of the stage before. A node's id is a
hash of the config that decides its result (seed, model, data, its stage's section)
and its parent's id, so one pretraining run feeds every branch below it and a finished
node (its `result.json` exists) is never run again.
"""

import dataclasses
import hashlib
import itertools
import json
import os
from collections.abc import Iterable

import jax
import ml_collections as mlc

from retention_jax import config as config_lib
from retention_jax import data, sharding, stage
from retention_jax import model as model_lib
from retention_jax.analysis import results as results_lib

# Data keys that change where or how fast data is read, not which tokens: not identity.
DATA_NOT_IDENTITY = ("workers", "cache_dir")
RESULTS = "results.jsonl"


@dataclasses.dataclass(frozen=True)
class Node:
    id: str
    stage: str
    cfg: mlc.ConfigDict
    parent: "Node | None"
    swept: dict

    @property
    def identity(self) -> dict:
        c = stage.model_config(self.cfg, self.stage)
        return {
            "stage": self.stage,
            "seed": self.cfg.seed,
            "model": c.to_dict(),
            "data": {
                k: v for k, v in self.cfg.data.to_dict().items() if k not in DATA_NOT_IDENTITY
            },
            self.stage: self.cfg[self.stage].to_dict(),
            "parent": self.parent.id if self.parent else None,
        }

    def lineage(self) -> list["Node"]:
        return ([*self.parent.lineage()] if self.parent else []) + [self]


def _digest(obj) -> str:
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _product(sweep: tuple) -> Iterable[dict]:
    keys = [path for path, _ in sweep]
    for values in itertools.product(*(values for _, values in sweep)):
        yield dict(zip(keys, values))


def expand(cfg: mlc.ConfigDict) -> list[Node]:
    """Every node of the graph, parents before children."""
    nodes, frontier = [], [None]
    for name in stage.STAGES:
        layer = []
        for parent in frontier:
            base = parent.cfg if parent else cfg
            for values in _product(cfg.sweep[name]):
                c = mlc.ConfigDict(base.to_dict())
                for path, value in values.items():
                    config_lib.assign(c, path, value)
                probe = Node("", name, c, parent, values)
                layer.append(Node(f"{name}-{_digest(probe.identity)}", name, c, parent, values))
        nodes += layer
        frontier = layer
    return nodes


def select(nodes: list[Node], selector: str) -> list[Node]:
    """Nodes whose id starts with, or whose stage equals, one of the comma-separated terms."""
    terms = [t for t in selector.split(",") if t]
    chosen = [n for n in nodes if any(n.id.startswith(t) or n.stage == t for t in terms)]
    if not chosen:
        raise ValueError(f"select={selector!r} matches no node; ids: {[n.id for n in nodes]}")
    return chosen


def plan_table(nodes: list[Node]) -> str:
    """The dry-run view: nodes, parents, swept values, steps, tokens per domain, FLOPs."""
    lines = [
        f"{'node':<22} {'parent':<22} {'steps':>7} "
        + " ".join(f"{d + '_tokens':>12}" for d in data.DOMAINS)
        + f" {'PFLOP':>9}  swept"
    ]
    total = 0.0
    for n in nodes:
        p = data.plan(n.stage, n.cfg)
        flops = model_lib.flops_per_token(n.cfg.model, p.seq_len) * sum(p.tokens.values())
        total += flops
        lines.append(
            f"{n.id:<22} {(n.parent.id if n.parent else '-'):<22} {p.num_steps:>7} "
            + " ".join(f"{p.tokens.get(d, 0):>12,}" for d in data.DOMAINS)
            + f" {flops / 1e15:>9.4f}  {json.dumps(n.swept)}"
        )
    lines.append(f"{len(nodes)} nodes, {total / 1e15:.4f} PFLOP of training in total")
    return "\n".join(lines)


def _check_identity(run_dir: str, record: dict) -> None:
    """Refuses a run directory written under a different config; names the keys."""
    path = os.path.join(run_dir, "config.json")
    record = json.loads(json.dumps(record, default=str))  # tuples -> lists, as stored
    old = stage.read_json(path)
    if old is None:
        if jax.process_index() == 0:
            stage.write_json(path, record)
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


def _corpus(node: Node, pending: list[Node], workdir: str, cache: dict) -> "data.Corpus":
    """The node's prepared data, sized for every pending node that shares its data config;
    checked against the model's vocabulary before anything compiles."""
    key = json.dumps(node.cfg.data.to_dict(), sort_keys=True)
    if key not in cache:
        same = [m for m in pending if m.cfg.data.to_dict() == node.cfg.data.to_dict()]
        plans = [data.plan(m.stage, m.cfg) for m in same]
        cache[key] = data.prepare(node.cfg, _data_root(workdir), plans)
    corpus = cache[key]
    if corpus.vocab_size > node.cfg.model.vocab_size:
        raise ValueError(
            f"model.vocab_size={node.cfg.model.vocab_size} is smaller than the vocabulary "
            f"({corpus.vocab_size}) of data.tokenizer={node.cfg.data.tokenizer!r}"
        )
    return corpus


def _data_root(workdir: str) -> str:
    """Token stores are memory-mapped, so they live on local disk even for gs:// workdirs."""
    return workdir if "://" not in workdir else os.path.expanduser("~/.cache/retention_jax")


def row(leaf: Node, results: dict[str, dict]) -> dict:
    """One results.jsonl line: lineage, swept values and the four losses of a leaf."""
    pre, post, ft = leaf.lineage()
    c = leaf.cfg
    r = {
        "run_id": ft.id,
        "ids": {"pretrain": pre.id, "posttrain": post.id, "finetune": ft.id},
        "pipeline": f"{c.data.post.name}->{c.data.ft.name}",
        "d_pre": c.data.pre.name,
        "d_post": c.data.post.name,
        "d_ft": c.data.ft.name,
        "lam": float(c.pretrain.exposure.lam),
        "exposure_mode": c.pretrain.exposure.mode,
        "compute_matched": bool(c.posttrain.compute_matched),
        "pool_tokens": int(c.data.post_pool_tokens),
        "seed": int(c.seed),
        "model_params": model_lib.count_params(c.model),
        "post_lr": float(c.posttrain.lr),
        "post_batch": int(c.posttrain.batch),
        "dropout": float(c.posttrain.dropout),
        "replay": float(c.posttrain.replay),
        "ft_lr": float(c.finetune.lr),
        "L_im": results[post.id]["val"]["post"],
        "L_ret": results[ft.id]["val"]["post"],
        "L_ft": results[ft.id]["val"]["ft"],
        "L_pre": results[ft.id]["val"]["pre"],
        "post_steps": results[post.id]["steps"],
        "post_result_step": results[post.id]["result_step"],
        "tokens": {n.stage: results[n.id]["tokens"] for n in (pre, post, ft)},
        "swept": {k: v for n in (pre, post, ft) for k, v in n.swept.items()},
    }
    r["method"] = results_lib.method_of(r)
    return r


def run(cfg: mlc.ConfigDict, workdir: str, *, dry_run: bool = False, only: str = "") -> list[dict]:
    """Runs the graph (or the nodes `only` selects) and writes `<workdir>/results.jsonl`.

    Returns the rows of every finished leaf.
    """
    config_lib.validate(cfg)
    if "://" not in workdir:
        workdir = os.path.abspath(workdir)  # Orbax writes to absolute paths only
    nodes = expand(cfg)
    for n in nodes:
        config_lib.validate(n.cfg)
    todo = select(nodes, only) if only else nodes
    if dry_run:
        print(plan_table(todo))
        return []
    mesh = sharding.make_mesh(cfg.mesh)
    runs = {n.id: os.path.join(workdir, "runs", n.id) for n in nodes}
    pending = [n for n in todo if stage.read_result(runs[n.id]) is None]
    pending_ids = {n.id for n in pending}
    corpora: dict[str, data.Corpus] = {}
    for n in todo:
        if n.id not in pending_ids:
            print(f"{n.id} already done", flush=True)
            continue
        corpus = _corpus(n, pending, workdir, corpora)
        _check_identity(
            runs[n.id], {"identity": n.identity, "data_fingerprint": corpus.fingerprint}
        )
        parent = None
        if n.parent is not None:
            pr = stage.read_result(runs[n.parent.id])
            if pr is None:
                raise RuntimeError(f"{n.id}: parent {n.parent.id} has not finished; run it first")
            parent = (runs[n.parent.id], pr["result_step"])
        meta = {
            "id": n.id,
            "parent": n.parent.id if n.parent else None,
            "parent_step": parent[1] if parent else None,
            "swept": n.swept,
        }
        result = stage.run(n.stage, n.cfg, runs[n.id], corpus, mesh, parent, meta)
        if jax.process_index() == 0:
            val = " ".join(f"{d} {v:.4f}" for d, v in result["val"].items())
            print(f"{n.id} done: val {val}", flush=True)
    rows = collect(workdir, nodes)
    return rows


def collect(workdir: str, nodes: list[Node]) -> list[dict]:
    """Rows of every finished leaf, written to results.jsonl (process 0, atomically)."""
    finished = {n.id: stage.read_result(os.path.join(workdir, "runs", n.id)) for n in nodes}
    rows = [
        row(leaf, finished)
        for leaf in nodes
        if leaf.stage == "finetune" and all(finished[n.id] for n in leaf.lineage())
    ]
    if jax.process_index() == 0:
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
        stage.write_text(os.path.join(workdir, RESULTS), text)
    return rows
