"""The graph module without JAX: every shipped config's expansion and ids, `--only`
selection, and a package import graph without cycles."""

import ast
import json
import os
import pathlib
import subprocess
import sys

import pytest

from configs import default
from retention_jax import errors, graph

ROOT = pathlib.Path(__file__).resolve().parent.parent

# (config module, argument, devices, nodes per stage, digest of the ids in order). The
# digests pin node identity: a change to what an id covers re-runs every finished node,
# so it must show here first.
SHIPPED = [
    ("default", "", 8, (9, 27, 108), "cabd190d5a7412c2"),
    ("default", "smoke", 8, (3, 6, 12), "4ebe8ac3194add72"),
    ("default_share", "", 8, (24, 24, 96), "516fc9513bb115ff"),
    ("paper_135m", "musicpile-chempile", 32, (2, 30, 180), "172a5c5955c8ddb2"),
    ("paper_135m", "flan-musicpile,smoke", 8, (2, 2, 4), "56d8d9109013897c"),
    ("paper_1b", "musicpile-chempile", 256, (2, 10, 60), "d1f768cacae66b6e"),
    ("1b_early_exposure", "musicpile-chempile", 256, (2, 10, 60), "d1f768cacae66b6e"),
    ("lambda_sweep", "added", 32, (15, 15, 15), "596ca6bbbbfab32d"),
    ("lambda_sweep", "compute_matched,lr", 32, (15, 45, 45), "52a5aad1c2b2a710"),
]

_EXPAND = """
import collections, hashlib, importlib, json, sys
from retention_jax import graph
out = []
for mod, arg, devices in json.loads(sys.argv[1]):
    m = importlib.import_module("configs." + mod)
    nodes = graph.expand(m.get_config(arg) if arg else m.get_config(), devices)
    table = graph.plan_table(nodes)
    counts = collections.Counter(n.stage for n in nodes)
    ids = " ".join(n.id for n in nodes)
    out.append([[counts[s] for s in ("pretrain", "posttrain", "finetune")],
                hashlib.sha256(ids.encode()).hexdigest()[:16], len(table.splitlines())])
print(json.dumps({"rows": out, "jax": sorted(m for m in sys.modules if m.split(".")[0] in
                  ("jax", "flax", "optax", "orbax", "grain"))}))
"""


def test_every_shipped_graph_expands_without_jax():
    specs = [[mod, arg, devices] for mod, arg, devices, _, _ in SHIPPED]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", _EXPAND, json.dumps(specs)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.splitlines()[-1])
    assert got["jax"] == []  # expansion, identity and the dry-run table need no JAX
    for (mod, arg, _, counts, digest), (c, d, lines) in zip(SHIPPED, got["rows"]):
        assert (tuple(c), d) == (counts, digest), (mod, arg)
        assert lines >= sum(counts) + 4  # a line per node, a header and the totals


def test_nodes_are_resolved_once_with_their_stage_plan():
    nodes = graph.expand(default.get_config("smoke"), 8)
    for n in nodes:
        assert n.model == n.exp.model_for(n.stage)
        assert n.optimizer == n.exp.stage(n.stage).optimizer
        assert n.plan.batch == n.exp.stage(n.stage).batch
        assert n.schedule == n.optimizer.schedule(n.plan.num_steps, n.plan.batch * n.plan.seq_len)
        assert n.seed == n.exp.stage_seed(n.stage)
        assert n.id == f"{n.stage}-{graph.fileio.digest(n.identity)}"
        assert [m.stage for m in n.lineage()] == list(graph.config.STAGES)[: len(n.lineage())]
    # Ids are stable across expansions and independent of the devices a graph is checked
    # for when the batch splits the same way.
    again = graph.expand(default.get_config("smoke"), 8)
    assert [n.id for n in again] == [n.id for n in nodes]
    assert [n.id for n in graph.expand(default.get_config("smoke"), 1)] == [n.id for n in nodes]


def test_only_selects_stages_prefixes_and_modes():
    nodes = graph.expand(default.get_config("smoke"), 8)
    stages = [n.stage for n in nodes]
    assert graph.to_run(nodes, "") == nodes
    assert graph.to_run(nodes, graph.PREPARE) == nodes
    forecast = graph.to_run(nodes, graph.FORECAST)
    assert [n.stage for n in forecast] == [s for s in stages if s != "finetune"]
    assert len(graph.to_run(nodes, "finetune")) == 12
    assert len(graph.to_run(nodes, "pretrain,posttrain")) == 9
    assert graph.to_run(nodes, nodes[4].id[:14]) == [nodes[4]]
    assert graph.to_run(nodes, f"{nodes[0].id},{nodes[-1].id}") == [nodes[0], nodes[-1]]
    with pytest.raises(errors.UserError, match=r"--only=nothing: matches no node; .*pretrain"):
        graph.to_run(nodes, "nothing")


def _imports(path: pathlib.Path, name: str, modules: set[str]) -> set[str]:
    """The package modules `name` imports, at module level or inside functions."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        out |= {t for t in targets if t in modules and t != name}
    return out


def test_the_package_has_no_import_cycle():
    package = ROOT / "retention_jax"
    files = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    edges = {name: _imports(path, name, set(files)) for name, path in files.items()}
    # A package's __init__ re-exports its submodules: importing a submodule runs it.
    for name in files:
        parent = name.rpartition(".")[0]
        if parent in files:
            edges[name] = {e for e in edges[name] if e != parent}
    assert {"retention_jax.config", "retention_jax.data.sources"} <= set(files)
    cycles = []

    def visit(node: str, path: list[str], seen: set[str]) -> None:
        for nxt in sorted(edges[node]):
            if nxt in path:
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in seen:
                seen.add(nxt)
                visit(nxt, [*path, nxt], seen)

    for start in sorted(files):
        visit(start, [start], {start})
    assert cycles == []
