"""Two real JAX processes joined by jax.distributed, against one process with as many devices.

Each process runs `main.py` on the smoke graph with every stage-2 arm (added,
compute-matched, replay, dropout, LoRA; at λ = 0 and 1, so the compute-matched arm at
λ = 1 is a stage of 0 steps that saves its parent's parameters as they were restored),
shortened (fewer tokens per stage, one fine-tuning LR, a checkpoint every 4 steps), with
one fake CPU device; the reference is one process with two. Every process records the
files it opens for writing (a Python audit hook), so the test can tell who wrote what in
the shared work directory.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from retention_jax import lock

pytestmark = pytest.mark.slow

_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
_COMMON = [
    "--config=configs/default.py:smoke",
    "--config.pretrain.tokens=32768",
    "--config.posttrain.max_tokens=32768",
    "--config.finetune.tokens=8192",
    "--config.ckpt.every=4",
    "--config.sweep.finetune=(('finetune.lr', (1e-2,)),)",
]
# Stage 2's arms as one linked sweep entry: (lr, compute-matched, warmup fraction, early
# stopping every, replay, dropout, LoRA rank)
_ARM_KEYS = (
    "posttrain.lr",
    "posttrain.compute_matched",
    "posttrain.warmup_fraction",
    "posttrain.early_stop.every",
    "posttrain.replay",
    "posttrain.dropout",
    "posttrain.lora.rank",
)
_ADDED = (3e-3, False, 0.0, 4, 0.0, 0.0, 0)
_ARMS = (
    _ADDED,
    (3e-3, True, 0.1, 0, 0.0, 0.0, 0),  # compute-matched: 0 steps at λ = 1
    (3e-3, False, 0.0, 4, 0.1, 0.0, 0),  # replay
    (3e-3, False, 0.0, 4, 0.0, 0.1, 0),  # dropout
    (3e-3, False, 0.0, 4, 0.0, 0.0, 4),  # LoRA
)
# every arm at λ ∈ {0, 1}: 2 + 10 + 10 nodes
_FLAGS = [
    *_COMMON,
    "--config.sweep.pretrain=(('pretrain.exposure.lam', (0.0, 1.0)),)",
    f"--config.sweep.posttrain=(({_ARM_KEYS!r}, {_ARMS!r}),)",
]
# the killed job: the added arm at λ = 0 (3 of the same nodes; the kill and the resume do
# not depend on the arm)
_KILLED_FLAGS = [
    *_COMMON,
    "--config.sweep.pretrain=(('pretrain.exposure.lam', (0.0,)),)",
    f"--config.sweep.posttrain=(({_ARM_KEYS!r}, ({_ADDED!r},)),)",
]

# main.py under an audit hook that appends every path opened for writing (or renamed
# onto) to $RJ_WRITES; C++ writers (tensorstore's array chunks) are not seen.
_AUDITED_MAIN = """
import os, runpy, sys
log = open(os.environ["RJ_WRITES"], "a")
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT

def hook(event, args):
    if event == "open" and isinstance(args[0], str):
        mode, flags = args[1], args[2]
        if (mode and any(c in mode for c in "wax+")) or (flags or 0) & WRITE:
            log.write(os.path.abspath(args[0]) + "\\n")
            log.flush()
    elif event in ("os.rename", "os.replace") and isinstance(args[1], str):
        log.write(os.path.abspath(args[1]) + "\\n")
        log.flush()

sys.addaudithook(hook)
sys.argv = ["main.py", *sys.argv[1:]]
runpy.run_path("main.py", run_name="__main__")
"""


def _inherited(var: str) -> bool:
    """Whether a child keeps an environment variable: not JAX, XLA or TPU settings (each
    child gets its own), but the session's compilation cache."""
    cache = var.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))
    return cache or not var.startswith(("JAX_", "XLA_", "TPU_"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(
    workdir: str,
    process_id: int,
    num_processes: int,
    devices: int,
    port: int,
    flags: list[str] = _FLAGS,
):
    env = {k: v for k, v in os.environ.items() if _inherited(k)}
    env.update(
        PYTHONPATH=_ROOT,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        RJ_WRITES=f"{workdir}.writes.{process_id}",
        PYTHONUNBUFFERED="1",
        JAX_PLATFORMS="cpu",  # no TPU probe (libtpu installed: 0.5 s and warnings a process)
    )
    if num_processes > 1:
        env.update(
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            JAX_NUM_PROCESSES=str(num_processes),
            JAX_PROCESS_ID=str(process_id),
            JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
        )
    cmd = [sys.executable, "-c", _AUDITED_MAIN, *flags, f"--workdir={workdir}"]
    with open(f"{workdir}.log.{process_id}", "a") as log:  # the child keeps its own handle
        return subprocess.Popen(cmd, cwd=_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _start_pair(workdir: str, flags: list[str] = _FLAGS) -> list[subprocess.Popen]:
    port = _free_port()
    return [_start(workdir, i, 2, 1, port, flags) for i in range(2)]


def _wait(procs: list[subprocess.Popen], workdir: str, timeout_s: float = 1800) -> None:
    for i, p in enumerate(procs):
        rc = p.wait(timeout=timeout_s)
        if rc != 0:
            with open(f"{workdir}.log.{i}") as f:
                tail = f.read()[-3000:]
            raise AssertionError(f"process {i} exited with {rc}:\n{tail}")


def _rows(workdir: str) -> dict[str, dict]:
    with open(os.path.join(workdir, "results.jsonl")) as f:
        return {r["run_id"]: r for r in map(json.loads, f)}


def _writes(workdir: str, process_id: int) -> set[str]:
    """Paths under `workdir` the process opened for writing (relative to it)."""
    with open(f"{workdir}.writes.{process_id}") as f:
        paths = {os.path.relpath(p, workdir) for p in f.read().split()}
    return {p for p in paths if not p.startswith("..")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, str]:
    """One process with two devices, two processes with one each, and two processes
    killed by SIGKILL in the middle of a post-training node and then restarted."""
    base = tmp_path_factory.mktemp("multiprocess")
    single, pair, killed = (str(base / n) for n in ("single", "pair", "killed"))
    t = time.perf_counter()
    _wait([_start(single, 0, 1, 2, 0)], single)
    seconds = {"single": time.perf_counter() - t}
    t = time.perf_counter()
    _wait(_start_pair(pair), pair)
    seconds["pair"] = time.perf_counter() - t

    procs = _start_pair(killed, _KILLED_FLAGS)
    deadline = time.time() + 900
    while True:  # until a post-training node reaches step 8 (checkpoints at 4 and 8)
        with open(f"{killed}.log.0") as f:
            text = f.read()
        if any(x.startswith("posttrain-") and " step 8/16 " in x for x in text.splitlines()):
            break
        assert time.time() < deadline and procs[0].poll() is None, text[-3000:]
        time.sleep(0.2)
    for q in procs:
        q.send_signal(signal.SIGKILL)
    for q in procs:
        q.wait(timeout=60)
    assert all(q.returncode == -signal.SIGKILL for q in procs)
    assert not os.path.exists(os.path.join(killed, "results.jsonl"))
    t = time.perf_counter()
    _wait(_start_pair(killed, _KILLED_FLAGS), killed)
    seconds["restart"] = time.perf_counter() - t
    print("wall seconds:", {k: round(v, 1) for k, v in seconds.items()})
    return {"single": single, "pair": pair, "killed": killed}


def _nodes(workdir: str) -> list[str]:
    """The node run directories under `<workdir>/runs` (beside TensorBoard's summaries)."""
    names = os.listdir(os.path.join(workdir, "runs"))
    return sorted(n for n in names if n.startswith(("pretrain-", "posttrain-", "finetune-")))


def _checksums(workdir: str) -> dict[str, dict]:
    """Every node's result step as the checksums of its parameters and optimizer state."""
    out = {}
    for node in _nodes(workdir):
        run = os.path.join(workdir, "runs", node)
        with open(os.path.join(run, "result.json")) as f:
            step = json.load(f)["result_step"]
        with open(os.path.join(run, "ckpt", str(step), "checksums", "metadata")) as f:
            out[node] = json.load(f)
    return out


def _untimed(x):
    """A row without its wall times (`seconds`, `*_s`), which differ from run to run."""
    if isinstance(x, dict):
        return {k: _untimed(v) for k, v in x.items() if k != "seconds" and not k.endswith("_s")}
    return x


def test_two_processes_match_one_process_with_as_many_devices(runs):
    """Every leaf's row, and every node's result parameters and optimizer state (by their
    checksums), bit-identical; the compute-matched nodes at λ = 1 kept their parent's."""
    single, pair = _rows(runs["single"]), _rows(runs["pair"])
    assert len(single) == 10 and _untimed(single) == _untimed(pair)
    arms = ("", " (compute-matched)", "+replay", "+dropout", "+lora")
    want = {f"{m}{arm}" for m in ("unmixed", "mixed") for arm in arms}
    assert {r["method"] for r in pair.values()} == want
    sums = _checksums(runs["pair"])
    assert len(sums) == 22 and sums == _checksums(runs["single"])
    for row in pair.values():
        if row["lam"] == 1.0 and row["compute_matched"]:
            assert row["post_steps"] == 0
            ids = row["ids"]
            assert sums[ids["posttrain"]]["params"] == sums[ids["pretrain"]]["params"]


def test_only_process_0_writes_results_metrics_and_figures(runs):
    pair = runs["pair"]
    w0, w1 = _writes(pair, 0), _writes(pair, 1)
    figures = {  # atomic writes go through hidden temporary files, then a rename
        p for p in w0 if p.startswith("figures/") and not os.path.basename(p).startswith(".")
    }
    assert figures and all(os.path.exists(os.path.join(pair, p)) for p in figures)
    assert "results.jsonl" in w0
    runs_dirs = _nodes(pair)
    assert len(runs_dirs) == 22
    for node in runs_dirs:
        for name in ("metrics.jsonl", "result.json", "config.json"):
            assert f"runs/{node}/{name}" in w0
    # process 1 writes only its own pieces: its token stores, and in each checkpoint its
    # data-iterator state and the metadata of its array shards
    assert any(p.endswith("/data.orbax-checkpoint-tmp/process_1-of-2.json") for p in w1)
    for p in w1:
        if p.startswith("data_cache/") or p.startswith(".preflight-"):
            continue  # its token stores; its write probe of the work directory (removed)
        assert "/ckpt/" in p and p.endswith(("/process_1-of-2.json", "/process_1")), p


def test_killed_and_restarted_pair_equals_the_uninterrupted_run(runs):
    killed, pair = _rows(runs["killed"]), _rows(runs["pair"])
    assert len(killed) == 1 and all(_untimed(killed[i]) == _untimed(pair[i]) for i in killed)
    sums = _checksums(runs["killed"])
    assert len(sums) == 3 and all(sums[n] == _checksums(runs["pair"])[n] for n in sums)
    with open(f"{runs['killed']}.log.0") as f:
        assert "resumed at step" in f.read()


_LOCK_JOB = """
import os, sys
import jax
from retention_jax import lock, sharding
sharding.initialize_distributed()
try:
    lock.acquire_for_job(sys.argv[1])
    print("acquired", flush=True)
except lock.RunLocked as e:
    print("locked:", e, flush=True)
held = lock.acquire_for_job(sys.argv[2])
print("owner" if held else "member", lock.read_owner(sys.argv[2]).pid, flush=True)
jax.experimental.multihost_utils.sync_global_devices("checked")
if held:
    held.release()
"""


def test_a_job_takes_a_run_lock_on_process_0_and_fails_together(tmp_path):
    taken, free = str(tmp_path / "taken"), str(tmp_path / "free")
    port = _free_port()
    with lock.RunLock(taken):
        procs = []
        for i in range(2):
            env = {k: v for k, v in os.environ.items() if _inherited(k)}
            env.update(
                PYTHONPATH=_ROOT,
                XLA_FLAGS="--xla_force_host_platform_device_count=1",
                JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                JAX_NUM_PROCESSES="2",
                JAX_PROCESS_ID=str(i),
            )
            cmd = [sys.executable, "-c", _LOCK_JOB, taken, free]
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True))
        outs = [
            [x for x in p.communicate(timeout=300)[0].splitlines() if not x.startswith("[Gloo]")]
            for p in procs
        ]
    assert [p.returncode for p in procs] == [0, 0]
    pid0 = procs[0].pid
    for out in outs:  # both processes refuse the taken directory, naming this test's pid
        assert out[0].startswith(f"locked: {taken} is locked by owner "), out
        assert f"pid {os.getpid()}," in out[0]
    assert outs[0][1] == f"owner {pid0}" and outs[1][1] == f"member {pid0}"
    assert os.listdir(free) == []  # released by process 0
