"""The experiment graph as data: its nodes, each resolved once, their ids, selection and
the dry-run table. No I/O and no JAX: a graph is expanded, inspected and tested without
devices.

`cfg.sweep.<stage>` pairs dotted config paths (from the root: "pretrain.exposure.lam",
"posttrain.lr", "data.post_pool_tokens") with tuples of values; each stage's nodes are
the product of its sweep, under every node of the stage before, and the whole graph is
repeated per replicate (`config.replicate`). A node's id is a digest of the config that
decides its result (seed, model, data, its stage's section) and its parent's id, so one
pretraining run feeds every branch below it and a finished node is never run again.

Expansion resolves everything a stage run needs (typed config, model, optimizer
schedule, data plan, seed, early stopping) once per node; the stage runs from the
`Node` and never asks the config again.
"""

import dataclasses
import itertools
import json
from collections.abc import Iterable, Mapping

import ml_collections as mlc

from retention_jax import config, cost, errors, fileio
from retention_jax.data import sources
from retention_jax.data.plan import StagePlan
from retention_jax.data.plan import plan as plan_of

# Data keys that change where or how fast data is read, not which tokens: not identity.
DATA_NOT_IDENTITY = ("workers", "read_threads", "cache_dir")
PREPARE = "prepare"  # --only=prepare: the data wave
FORECAST = "forecast"  # --only=forecast: stages 1 and 2 with the probes, then a ranking


@dataclasses.dataclass(frozen=True)
class Node:
    """One stage run of the graph, resolved: what it trains, on which data, from where."""

    id: str
    stage: str
    cfg: mlc.ConfigDict  # the node's config as files spell it (its sweep values assigned)
    exp: config.Experiment  # the same, typed and validated
    parent: "Node | None"
    swept: dict
    replicate: int  # which copy of the graph (config.replicate); its children share it
    model: config.Model  # the model this stage trains (Experiment.model_for)
    optimizer: config.Optimizer
    plan: StagePlan  # exact budgets and the stream's index map
    schedule: Mapping[str, float]  # the optimizer's schedule over this plan
    seed: int  # of this stage's data order and dropout
    early_stopping: bool

    @property
    def identity(self) -> dict:
        return identity(self.stage, self.exp, self.model, self.parent)

    @property
    def data_key(self) -> str:
        """Nodes with equal keys read the same prepared stores."""
        return data_key(self.exp)

    def lineage(self) -> list["Node"]:
        return ([*self.parent.lineage()] if self.parent else []) + [self]


def identity(stage: str, exp: config.Experiment, model: config.Model, parent) -> dict:
    """What decides a node's result; its id is a digest of this."""
    data_cfg = dataclasses.asdict(exp.data)
    return {
        "stage": stage,
        "seed": exp.seed,
        "model": dataclasses.asdict(model),
        "data": {k: v for k, v in data_cfg.items() if k not in DATA_NOT_IDENTITY},
        stage: _flat_section(exp.stage(stage)),
        "parent": parent.id if parent else None,
    }


def data_key(exp: config.Experiment) -> str:
    return json.dumps(dataclasses.asdict(exp.data), sort_keys=True, default=str)


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


def resolve(stage: str, cfg: mlc.ConfigDict, exp, parent, swept: dict, replicate: int) -> Node:
    """The node of `stage` under `parent` with config `cfg` (typed as `exp`), resolved."""
    model, optimizer = exp.model_for(stage), exp.stage(stage).optimizer
    plan = plan_of(stage, exp)
    tokens_per_step = plan.batch * plan.seq_len
    config.check_schedule(stage, optimizer, plan.num_steps, tokens_per_step)
    return Node(
        id=f"{stage}-{fileio.digest(identity(stage, exp, model, parent))}",
        stage=stage,
        cfg=cfg,
        exp=exp,
        parent=parent,
        swept=swept,
        replicate=replicate,
        model=model,
        optimizer=optimizer,
        plan=plan,
        schedule=optimizer.schedule(plan.num_steps, tokens_per_step),
        seed=exp.stage_seed(stage),
        early_stopping=exp.early_stopping(stage),
    )


def expand(cfg: mlc.ConfigDict, num_devices: int, num_processes: int = 1) -> list[Node]:
    """Every node of the graph, each validated and resolved, stage by stage (parents before
    children); within a stage, replicate 0's nodes, then replicate 1's, ..."""
    config.check_sweep(cfg)
    count, _ = config.replicates(cfg)
    checked: set[str] = set()
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
                    exp = config.parse(c, num_devices, num_processes)
                    if data_key(exp) not in checked:  # once per data config
                        check_sources(exp)
                        checked.add(data_key(exp))
                    layer.append(resolve(name, c, exp, parent, values, r))
            nodes += layer
            frontier = layer
    return sorted(nodes, key=lambda node: config.STAGES.index(node.stage))  # stable


def check_sources(exp: config.Experiment) -> None:
    """What can be checked of each domain's source without opening it (the data layer
    owns its sources' rules)."""
    for name in config.DOMAINS:
        sources.check(exp.data.domain(name), f"data.{name}")


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


def to_run(nodes: list[Node], only: str) -> list[Node]:
    """The nodes `--only` asks for: all of them by default and for the prepare step,
    stages 1 and 2 for the forecast, else `select`."""
    if only == FORECAST:
        return [n for n in nodes if n.stage != "finetune"]
    if only and only != PREPARE:
        return select(nodes, only)
    return nodes


def flops(node: Node) -> float:
    """The node's training FLOPs (cost.flops_per_token of the base model)."""
    return cost.flops_per_token(node.exp.model, node.plan.seq_len) * sum(node.plan.tokens.values())


def plan_table(nodes: list[Node]) -> str:
    """The dry-run view: nodes, parents, steps, warmup and microbatches a step, tokens per
    domain, FLOPs."""
    lines = [
        f"{'node':<22} {'parent':<22} {'rep':>3} {'steps':>7} {'warmup':>7} {'micro':>5} "
        + " ".join(f"{d + '_tokens':>12}" for d in config.DOMAINS)
        + f" {'PFLOP':>9}  swept"
    ]
    for n in nodes:
        p, warmup = n.plan, n.schedule["warmup_steps"]
        mark = "" if warmup < p.num_steps else "!"
        lines.append(
            f"{n.id:<22} {(n.parent.id if n.parent else '-'):<22} {n.replicate:>3} "
            f"{p.num_steps:>7} {f'{warmup}{mark}':>7} "
            f"{n.optimizer.microbatches:>5} "
            + " ".join(f"{p.tokens.get(d, 0):>12,}" for d in config.DOMAINS)
            + f" {flops(n) / 1e15:>9.4f}  {json.dumps(n.swept)}"
        )
    return "\n".join(lines + _table_footer(nodes))


def _table_footer(nodes: list[Node]) -> list[str]:
    total = sum(flops(n) for n in nodes)
    hours = cost.device_hours(total)
    peak = cost.PEAK_BF16[cost.PLAN_DEVICE]
    lines = [
        f"{len(nodes)} nodes, {total / 1e15:.4f} PFLOP of training in total",
        f"≈ {hours:,.1f} device-hours on {cost.PLAN_DEVICE} at {cost.PLAN_MFU:.0%} MFU of its "
        f"{peak / 1e12:,.0f} TFLOP/s bf16 peak (training only)",
    ]
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
    return lines
