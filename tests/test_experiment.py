"""The experiment graph end to end: results, skipping, branching, resume, early stopping."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import default
from retention_jax import (
    callbacks,
    checkpoint,
    config,
    data,
    errors,
    experiment,
    graph,
    runtime,
    sharding,
    stage,
    trainer,
)
from tests import helpers


def _rows(workdir):
    with open(os.path.join(workdir, experiment.RESULTS)) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_smoke_graph_results_and_rerun_trains_nothing(smoke_run):
    smoke_workdir, smoke_rt = smoke_run
    assert smoke_rt.compiles["train"] == 1  # 21 nodes, one train-step shape: one compile
    rows = _rows(smoke_workdir)
    nodes = experiment.expand(default.get_config("smoke"))
    leaves = [n for n in nodes if n.stage == "finetune"]
    assert len(rows) == len(leaves) == 12
    assert {r["run_id"] for r in rows} == {n.id for n in leaves}
    for r in rows:
        for k in ("L_im", "L_ret", "L_ft", "L_pre"):
            assert np.isfinite(r[k]) and r[k] > 0  # 1e-2 after a 0-step stage 2 passes 12
        assert r["tokens"]["finetune"] == {"pre": 0, "post": 0, "ft": 8_192}
        lam = r["lam"]
        assert r["tokens"]["pretrain"] == {"pre": 65_536, "post": int(lam * 2_048), "ft": 0}
    assert {r["method"] for r in rows} == {
        "mixed",
        "unmixed",
        "mixed (compute-matched)",
        "unmixed (compute-matched)",
    }

    stamps = {
        n.id: os.path.getmtime(os.path.join(smoke_workdir, "runs", n.id, stage.RESULT))
        for n in nodes
    }
    rt = runtime.Runtime.create(default.get_config("smoke").mesh, default.get_config().rules)
    again = experiment.run(default.get_config("smoke"), smoke_workdir, rt=rt)
    assert rt.compiles["train"] == 0  # nothing was compiled, so nothing trained
    assert stamps == {
        n.id: os.path.getmtime(os.path.join(smoke_workdir, "runs", n.id, stage.RESULT))
        for n in nodes
    }
    assert again == rows


@pytest.mark.slow
def test_smoke_early_stopping_result_is_best_eval(smoke_workdir):
    c = default.get_config("smoke")
    for n in experiment.expand(c):
        if n.stage != "posttrain" or not n.exp.early_stopping("posttrain"):
            continue  # compute-matched nodes make one pass without evaluations
        r = stage.read_result(os.path.join(smoke_workdir, "runs", n.id))
        steps, losses = zip(*r["evals"])
        every = n.exp.posttrain.early_stop.every
        assert list(steps) == list(range(every, r["steps"] + 1, every))
        assert r["result_step"] == steps[int(np.argmin(losses))]
        if r["stopped_early"]:
            after = len(steps) - 1 - int(np.argmin(losses))
            assert after == c.posttrain.early_stop.patience


def test_early_stop_rule():
    es = callbacks.EarlyStopRule(patience=2, min_delta=0.01)
    decisions = [es.update(s, v) for s, v in [(10, 3.0), (20, 2.0), (30, 1.995), (40, 2.5)]]
    assert decisions == [False, False, False, True]  # 1.995 is within min_delta: no gain
    assert (es.best, es.best_step, es.bad) == (2.0, 20, 2)
    never = callbacks.EarlyStopRule(patience=0, min_delta=0.0)
    assert not any(never.update(s, 5.0) for s in range(10))


def test_dry_run_lists_nodes_and_budgets(capsys):
    experiment.dry_run(default.get_config("smoke"))
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.split()[0].split("-")[0] in config.STAGES]
    assert [line.split("-")[0] for line in lines] == ["pretrain"] * 3 + ["posttrain"] * 6 + [
        "finetune"
    ] * 12
    lam1 = next(line for line in lines if '"pretrain.exposure.lam": 1.0' in line)
    # replicate, steps, warmup, microbatches, pre, post, ft tokens
    assert lam1.split()[2:9] == ["0", "33", "4", "1", "65,536", "2,048", "0"]
    lam0 = next(line for line in lines if '"pretrain.exposure.lam": 0.0' in line)
    assert lam0.split()[2:9] == ["0", "32", "4", "1", "65,536", "0", "0"]
    assert "21 nodes" in out
    assert "memory per device, posttrain step (estimate): " in out
    assert "data: 1 data config(s) opened" in out
    assert not os.path.exists("/nonexistent")


def _smoke_node(name: str, lam: float = 0.0) -> graph.Node:
    nodes = experiment.expand(default.get_config("smoke"))
    return next(n for n in nodes if n.stage == name and n.cfg.pretrain.exposure.lam == lam)


def _copy_runs(src: str, dst: str, *nodes: graph.Node) -> None:
    """Reuses finished parents of the shared smoke run instead of training them again."""
    for n in nodes:
        shutil.copytree(os.path.join(src, "runs", n.id), os.path.join(dst, "runs", n.id))


class _Killed(BaseException):
    """A kill: not a failure the graph contains (those derive from Exception)."""


def _params(run_dir: str, step: int, node: graph.Node):
    e = node.exp
    mesh = sharding.make_mesh(e.mesh)
    fns = trainer.step_functions(
        e.model_for(node.stage), e.stage(node.stage).optimizer, mesh, e.rules
    )
    return jax.device_get(
        checkpoint.restore_params(os.path.join(run_dir, "ckpt"), step, fns.state_shapes.params)
    )


def test_start_resolution_order():
    assert stage.resolve_start(12, ("/p", 30)) == stage.Start("resume", 12)
    assert stage.resolve_start(None, ("/p", 30)) == stage.Start("branch", 30, "/p")
    assert stage.resolve_start(None, None) == stage.Start("init")
    assert stage.resolve_start(0, None) == stage.Start("resume", 0)


@pytest.mark.slow
def test_branch_starts_from_parent_params_with_fresh_optimizer(smoke_workdir, tmp_path):
    pre, post = _smoke_node("pretrain"), _smoke_node("posttrain")
    _copy_runs(smoke_workdir, str(tmp_path), pre)
    seen = []

    def look(t):  # the branch is made; no step is needed
        seen.append(jax.device_get((t.state.params, t.state.opt, t.state.step)))
        raise _Killed()

    with pytest.raises(_Killed):
        experiment.run(
            default.get_config("smoke"),
            str(tmp_path),
            only=post.id,
            extra_callbacks=[callbacks.OnStart(look)],
        )
    parent = stage.read_result(os.path.join(smoke_workdir, "runs", pre.id))
    expected = _params(os.path.join(smoke_workdir, "runs", pre.id), parent["result_step"], pre)
    ((params, opt, step),) = seen
    assert int(step) == 0
    jax.tree.map(np.testing.assert_array_equal, params, expected)
    adam = opt[1]
    assert int(adam.count) == 0
    assert all(float(np.abs(x).max()) == 0.0 for x in jax.tree.leaves((adam.mu, adam.nu)))
    record = json.loads((tmp_path / "runs" / post.id / "config.json").read_text())
    assert record["identity"]["parent"] == pre.id


def _losses(run_dir):
    """(step, loss, val/post) of metrics.jsonl lines: what a resume must repeat."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        lines = [json.loads(x) for x in f]
    return [(m["step"], m.get("loss"), m.get("val/post")) for m in lines]


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, kill_after, resumed_at", [("pretrain", 20, 16), ("posttrain", 10, 8)]
)
def test_killed_stage_resumes_to_identical_result(
    smoke_workdir, tmp_path, monkeypatch, name, kill_after, resumed_at
):
    """A stage dies mid-way; rerunning the command finishes it exactly as the uninterrupted
    smoke run did: parameters, losses, evaluations, tokens and metric lines."""
    node = _smoke_node(name)
    workdir = str(tmp_path / "killed")
    if node.parent is not None:
        _copy_runs(smoke_workdir, workdir, node.parent)
    monkeypatch.chdir(tmp_path)  # the first attempt names its work directory relatively
    with pytest.raises(_Killed):
        experiment.run(
            default.get_config("smoke"),
            "killed",
            only=node.id,
            extra_callbacks=[callbacks.RaiseAt(kill_after, _Killed())],
        )
    monkeypatch.undo()
    run_dirs = [os.path.join(w, "runs", node.id) for w in (smoke_workdir, workdir)]
    assert stage.read_result(run_dirs[1]) is None
    assert checkpoint.manager(os.path.join(run_dirs[1], "ckpt")).latest_step() == resumed_at

    experiment.run(default.get_config("smoke"), workdir, only=node.id)
    a, b = (stage.read_result(d) for d in run_dirs)
    for key in ("val", "tokens", "steps", "result_step", "evals", "stopped_early"):
        assert a[key] == b[key], key
    assert _losses(run_dirs[0]) == _losses(run_dirs[1])
    pa, pb = (_params(d, a["result_step"], node) for d in run_dirs)
    jax.tree.map(np.testing.assert_array_equal, pa, pb)


def test_changed_config_under_existing_id_is_refused(tmp_path):
    c = helpers.smoke_one_pretrain()
    (pre,) = [n for n in experiment.expand(c) if n.stage == "pretrain"]
    run_dir = tmp_path / "runs" / pre.id
    run_dir.mkdir(parents=True)
    record = {"identity": pre.identity, "data_fingerprint": "another corpus"}
    record["identity"]["pretrain"]["lr"] = 0.5
    (run_dir / "config.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"keys: data_fingerprint, identity\.pretrain\.lr"):
        experiment.run(c, str(tmp_path), only=pre.id)


def test_select_nodes():
    nodes = experiment.expand(default.get_config("smoke"))
    assert len(graph.select(nodes, "finetune")) == 12
    assert graph.select(nodes, nodes[3].id[:14]) == [nodes[3]]
    with pytest.raises(errors.UserError, match="--only=nothing: matches no node; allowed: "):
        graph.select(nodes, "nothing")


def test_ids_are_content_addressed():
    a = experiment.expand(default.get_config("smoke"))
    b = experiment.expand(default.get_config("smoke"))
    assert [n.id for n in a] == [n.id for n in b]
    c = default.get_config("smoke")
    c.finetune.tokens = 4_096
    d = experiment.expand(c)
    assert [n.id for n in d[:9]] == [n.id for n in a[:9]]  # upstream nodes are shared
    assert {n.id for n in d[9:]}.isdisjoint({n.id for n in a[9:]})
    assert len(data.DOMAINS) == 3


@pytest.mark.parametrize(
    "config_arg, nodes",
    [
        ("configs/1b_early_exposure.py:musicpile-chempile", 72),
        ("configs/paper_135m.py:flan-chempile", 212),
        ("configs/lambda_sweep.py:compute_matched", 45),
    ],
)
def test_dry_run_of_pod_configs_on_one_device(tmp_path, config_arg, nodes):
    """A pod run's plan is inspected on a laptop: validated for the config's own mesh."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device
    out = subprocess.run(
        [
            sys.executable,
            "main.py",
            f"--config={config_arg}",
            "--dry_run",
            f"--workdir={tmp_path / 'w'}",
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"{nodes} nodes," in out.stdout
    assert not (tmp_path / "w").exists()
