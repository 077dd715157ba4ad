"""The XManager launcher's plan: one job per node, in stage waves (no XManager needed)."""

import functools
import importlib.util
import os
import shlex
import subprocess
import types

import pytest

from configs import default
from retention_jax import experiment

_PATH = os.path.join(os.path.dirname(__file__), "..", "xm_launch", "launch.py")


@functools.cache
def _launch():
    """xm_launch/launch.py, loaded once (its absl flags can be defined only once)."""
    spec = importlib.util.spec_from_file_location("launch", _PATH)
    launch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch)
    return launch


def test_waves_follow_the_graph():
    launch = _launch()
    c = default.get_config("smoke")
    plan = launch.waves(c)
    assert [len(w) for w in plan] == [3, 6, 12]
    nodes = {n.id: n for n in experiment.expand(c)}
    for parents, children in zip(plan, plan[1:]):
        assert {nodes[i].parent.id for i in children} == set(parents)


def test_xm_jobs_prepare_then_one_per_node_in_stage_waves_then_collect():
    launch = _launch()
    c = default.get_config("smoke")
    overrides = ["--config=configs/default.py:smoke", "--config.seed=3"]
    plan = launch.jobs(c, "gs://bucket/w", overrides)
    assert [len(w) for w in plan] == [1, 3, 6, 12, 1]
    assert plan[0] == [
        launch.Job("prepare", (*overrides, "--workdir=gs://bucket/w", "--only=prepare"))
    ]
    for wave, ids in zip(plan[1:], launch.waves(c)):
        assert [j.node for j in wave] == ids
        for j in wave:
            assert j.args == (*overrides, "--workdir=gs://bucket/w", f"--only={j.node}")
    assert plan[-1] == [launch.Job("", (*overrides, "--workdir=gs://bucket/w"))]


def test_xm_image_and_requested_accelerator():
    pytest.importorskip("xmanager")
    from absl import flags

    flags.FLAGS.mark_as_parsed()  # xm.python_container reads a flag of its own
    launch = _launch()
    image = launch.packageable("TPU_V3", "python:3.11-slim").executable_spec
    assert image.base_image == "python:3.11-slim"
    assert image.path == os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
    assert image.entrypoint.commands == ["python main.py $@"]
    assert image.docker_instructions[-1] == (
        "RUN pip install -q -c xm_launch/constraints.txt -e . 'jax[tpu]'"
    )
    assert "'.[cuda]'" in launch.docker_instructions("H100")[-1]
    for name, count in (("TPU_V3", 8), ("H100", 8), ("A100", 1)):
        req = launch.executor(name, count).requirements
        assert (req.accelerator.name, req.task_requirements[req.accelerator]) == (name, count)
    assert launch.check_accelerator("tpu_v2", 8) == "TPU_V2"


@pytest.mark.parametrize(
    "accelerator, count, why",
    [
        ("TPU_V5P", 8, "--accelerator=TPU_V5P: allowed P4, T4,"),
        ("TPU_V5P", 8, "TPU pod slices run with xm_launch/tpu_vm.sh"),
        ("TPU_V3", 32, "--count=32: a TPU_V3 host has 8 cores"),
        ("H100", 0, "--count=0: allowed a positive number of H100"),
        ("K80", 1, "--accelerator=K80: allowed"),
    ],
)
def test_xm_refuses_what_vertex_cannot_give(accelerator, count, why):
    with pytest.raises(ValueError, match=why):
        _launch().check_accelerator(accelerator, count)


_TPU_VM = os.path.join(os.path.dirname(__file__), "..", "xm_launch", "tpu_vm.sh")


def _tpu_vm_dry_run(*args: str) -> str:
    env = {**os.environ, "TPU_VM_DRY_RUN": "1"}
    cmd = ["bash", _TPU_VM, "rj-test", "us-east5-a", "v5p-64", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout


def test_tpu_vm_passes_every_argument_intact(tmp_path):
    tricky = [
        '--config.sweep.finetune=(("finetune.lr", (1e-4, 1e-2)),)',
        "--config.data.note=a b; $(touch pwned) & `touch pwned` | * 'q' \"qq\" \\",
        "--only=pretrain",
    ]
    out = _tpu_vm_dry_run("configs/default.py:smoke", "gs://bucket/w x", *tricky)
    run_sh = out.split("--- run.sh\n")[1].split("--- constraints.txt\n")[0]
    [line] = [x for x in run_sh.splitlines() if x.startswith("args=(")]
    # the hosts' bash reads the line; print back what main.py would receive
    echo = subprocess.run(
        ["bash", "-c", line + '\nprintf "%s\\0" "${args[@]}"'],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    got = echo.stdout.split("\0")[:-1]
    assert got == ["--config=configs/default.py:smoke", "--workdir=gs://bucket/w x", *tricky]
    assert os.listdir(tmp_path) == []  # nothing in the arguments was executed
    assert 'python main.py "${args[@]}"' in run_sh


def test_tpu_vm_installs_pinned_python_stack_and_runs_detached():
    out = _tpu_vm_dry_run("configs/default.py:smoke", "gs://bucket/w")
    run_sh = out.split("--- run.sh\n")[1].split("--- constraints.txt\n")[0]
    constraints = out.split("--- constraints.txt\n")[1].split("---\n")[0].splitlines()
    assert "command -v python3.12 || command -v python3.11" in run_sh
    assert "apt-get install -y -q python3.11 python3.11-venv" in run_sh
    assert "pip install -q -c constraints.txt -e src 'jax[tpu]'" in run_sh
    assert "jax>=0.10.2,<0.11" in constraints and "flax>=0.12.8,<0.13" in constraints
    assert all("[" not in c for c in constraints)  # pip constraints take no extras
    gcloud = [shlex.split(x[2:]) for x in out.splitlines() if x.startswith("+ gcloud")]
    tpu = ["gcloud", "compute", "tpus", "tpu-vm"]
    where = ["--zone", "us-east5-a"]
    assert gcloud[0] == [
        *tpu, "create", "rj-test", *where, "--accelerator-type", "v5p-64",
        "--version", "v2-alpha-tpuv5",
    ]  # fmt: skip
    assert gcloud[1] == [
        *tpu,
        "ssh",
        "rj-test",
        *where,
        "--worker=all",
        "--command",
        "mkdir -p ~/rj",
    ]
    assert gcloud[2][:5] == [*tpu, "scp"] and gcloud[2][-4:] == [
        "rj-test:rj/",
        *where,
        "--worker=all",
    ]
    assert [os.path.basename(f) for f in gcloud[2][5:-4]] == [
        "src.tar.gz",
        "run.sh",
        "constraints.txt",
    ]
    assert gcloud[3][:-1] == [*tpu, "ssh", "rj-test", *where, "--worker=all", "--command"]
    start = gcloud[3][-1]
    assert (
        "setsid nohup bash ~/rj/run.sh > ~/rj/rj-test.$(hostname).log 2>&1 < /dev/null &" in start
    )
    assert start.index("rm -f ~/rj/rc") < start.index("setsid")  # the last exit code is cleared


def test_tpu_vm_compiles_for_the_slice_before_creating_it():
    out = _tpu_vm_dry_run("configs/default.py:smoke", "gs://bucket/w", "--config.seed=3")
    lines = [x for x in out.splitlines() if x.startswith("+ ")]
    check = shlex.split(lines[0][2:])
    assert check[1:] == [
        "main.py",
        "--config=configs/default.py:smoke",
        "--workdir=gs://bucket/w",
        "--config.seed=3",
        "--dry_run",
        "--topology=v5p-64",
    ]
    assert lines[1].startswith("+ gcloud compute tpus tpu-vm create")


def test_xm_compiles_for_the_tpu_host_before_launching(monkeypatch):
    """A TPU job's config is compiled for the host's chips (v3-8) first; a GPU's is not."""
    launch = _launch()
    checked = []
    monkeypatch.setattr(launch.topology, "check", lambda cfg, name: checked.append(name))
    monkeypatch.setattr(launch.topology, "cpu_host", lambda: None)
    monkeypatch.setattr(launch, "jobs", lambda *a: [])
    flag = types.SimpleNamespace
    monkeypatch.setattr(launch, "_CONFIG", flag(value=None))
    monkeypatch.setattr(launch, "_WORKDIR", flag(value="gs://b/w"))
    monkeypatch.setattr(launch, "_COUNT", flag(value=8))
    monkeypatch.setattr(launch, "_DRY_RUN", flag(value=True))
    for accelerator in ("TPU_V3", "H100"):
        monkeypatch.setattr(launch, "_ACCELERATOR", flag(value=accelerator))
        launch.main([])
    assert checked == ["v3-8"]
