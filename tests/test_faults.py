"""Faults with real processes and signals: preemption, damaged checkpoints, a second
process on a running node, a failing node among siblings, an unwritable work directory.

Each compares with the uninterrupted smoke experiment (tests/conftest.py): the same
config gives the same node ids, so a recovered node must end bit-identical to it.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import default
from retention_jax import (
    callbacks,
    checkpoint,
    experiment,
    graph,
    preflight,
    sharding,
    stage,
    trainer,
)
from retention_jax.data import store
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _node(name: str, lam: float = 0.0) -> graph.Node:
    nodes = experiment.expand(default.get_config("smoke"))
    return next(n for n in nodes if n.stage == name and n.exp.pretrain.exposure.lam == lam)


def _start(workdir: str, only: str, *flags: str) -> subprocess.Popen:
    cmd = [sys.executable, "main.py", "--config=configs/default.py:smoke", f"--workdir={workdir}"]
    return subprocess.Popen(
        [*cmd, f"--only={only}", *flags],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for(proc: subprocess.Popen, pattern: str, timeout: float = 300) -> list[str]:
    """Lines of `proc`'s output up to the first that matches `pattern`."""
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if re.search(pattern, line):
            return lines
    proc.kill()
    raise AssertionError(f"{pattern!r} never appeared:\n{''.join(lines[-30:])}")


def _finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def _shapes(node: graph.Node):
    """The node's parameters as a restore target (shapes and shardings)."""
    e = node.exp
    fns = trainer.step_functions(
        e.model_for(node.stage), e.stage(node.stage).optimizer, sharding.make_mesh(e.mesh), e.rules
    )
    return fns.state_shapes.params


def _params(run_dir: str, step: int, node: graph.Node):
    ckpt = os.path.join(run_dir, "ckpt")
    return jax.device_get(checkpoint.restore_params(ckpt, step, _shapes(node)))


def _same_result(smoke_workdir: str, workdir: str, node: graph.Node) -> None:
    a, b = (stage.read_result(os.path.join(w, "runs", node.id)) for w in (smoke_workdir, workdir))
    for key in ("val", "tokens", "steps", "result_step", "evals", "stopped_early"):
        assert a[key] == b[key], key
    pa, pb = (
        _params(os.path.join(w, "runs", node.id), a["result_step"], node)
        for w in (smoke_workdir, workdir)
    )
    jax.tree.map(np.testing.assert_array_equal, pa, pb)


@pytest.mark.slow
def test_sigterm_checkpoints_then_a_damaged_latest_step_falls_back(smoke_workdir, tmp_path):
    """SIGTERM: the stage saves at the next step boundary and exits 75. The latest step
    is then damaged; the rerun restores the one before and ends bit-identical."""
    node = _node("pretrain")
    workdir = str(tmp_path / "w")
    proc = _start(workdir, node.id, "--config.ckpt.every=4")
    _wait_for(proc, rf"{node.id} step 8/")
    proc.send_signal(signal.SIGTERM)
    rc, out = _finish(proc)
    assert rc == callbacks.EXIT_PREEMPTED, out[-3000:]
    step = int(re.search(r"preempted: checkpointed step (\d+)", out).group(1))
    run_dir = os.path.join(workdir, "runs", node.id)
    mngr = checkpoint.manager(os.path.join(run_dir, "ckpt"))
    steps = mngr.all_steps()
    assert step >= 8 and mngr.latest_step() == step and stage.read_result(run_dir) is None
    previous = max(s for s in steps if s < step)
    assert previous == 4 * ((step - 1) // 4)  # the periodic save before the preemption
    for root, _, files in os.walk(os.path.join(run_dir, "ckpt", str(step), "params")):
        for f in files:  # truncate every parameter file of the latest step
            open(os.path.join(root, f), "w").close()

    rc, out = _finish(_start(workdir, node.id))
    assert rc == 0, out[-3000:]
    assert f"step {step} cannot be restored" in out and f"resumed at step {previous}" in out
    _same_result(smoke_workdir, workdir, node)


@pytest.mark.slow
def test_a_second_process_on_a_running_node_is_refused(smoke_workdir, tmp_path):
    node = _node("pretrain", 1.0)
    workdir = str(tmp_path / "w")
    first = _start(workdir, node.id)
    _wait_for(first, rf"{node.id} step 8/")
    first.send_signal(signal.SIGSTOP)  # it must still be running when the second one starts
    try:
        rc, out = _finish(_start(workdir, node.id))
    finally:
        first.send_signal(signal.SIGCONT)
    assert rc == 1 and "is locked by owner" in out and "skipped" in out, out[-3000:]
    rc, out = _finish(first)
    assert rc == 0, out[-3000:]
    assert not os.path.exists(os.path.join(workdir, "runs", node.id, "LOCK"))
    _same_result(smoke_workdir, workdir, node)


@pytest.mark.slow
def test_failing_node_is_recorded_and_its_siblings_finish(smoke_workdir, tmp_path):
    post = _node("posttrain")
    for n in (post.parent, post):  # finished parents, as a rerun would find them
        shutil.copytree(os.path.join(smoke_workdir, "runs", n.id), tmp_path / "runs" / n.id)
    c = helpers.smoke_one_pretrain()
    leaves = [n for n in experiment.expand(c) if n.stage == "finetune"]
    injected = callbacks.RaiseAt(2, FloatingPointError("non-finite loss=nan (injected)"), times=1)
    with pytest.raises(experiment.GraphFailed) as e:
        experiment.run(c, str(tmp_path), extra_callbacks=[injected])
    assert list(e.value.failures) == [leaves[0].id]
    record = json.loads((tmp_path / "runs" / leaves[0].id / experiment.FAILED).read_text())
    assert record["error"] == "FloatingPointError: non-finite loss=nan (injected)"
    assert record["last_checkpoint_step"] is None  # the fine-tuning stage saves at its end
    for leaf in leaves[1:]:  # its siblings finished
        assert stage.read_result(str(tmp_path / "runs" / leaf.id)) is not None
    assert {r["run_id"] for r in e.value.rows} == {n.id for n in leaves[1:]}

    with pytest.raises(experiment.GraphFailed, match="not retried"):
        experiment.run(c, str(tmp_path))  # a failed node is not rerun by default
    rows = experiment.run(c, str(tmp_path), retry_failed=True)
    assert {r["run_id"] for r in rows} == {n.id for n in leaves}
    assert not (tmp_path / "runs" / leaves[0].id / experiment.FAILED).exists()
    with open(os.path.join(smoke_workdir, experiment.RESULTS)) as f:
        want = [json.loads(x) for x in f]
    got = {r["run_id"]: r for r in rows}
    for r in want:
        if r["run_id"] in got:
            assert got[r["run_id"]]["L_ret"] == r["L_ret"]


def test_unwritable_workdir_is_refused_before_tokenizing(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the work directory's parent should be")
    with pytest.raises(preflight.PreflightError, match="is not writable"):
        experiment.run(default.get_config("smoke"), str(blocker / "w"))
    assert not (tmp_path / "file.d").exists() and blocker.read_text().startswith("a file")


@pytest.mark.slow
def test_a_child_of_a_parent_trained_on_other_tokens_is_refused(smoke_workdir, tmp_path):
    post = _node("posttrain")
    shutil.copytree(
        os.path.join(smoke_workdir, "runs", post.parent.id), tmp_path / "runs" / post.parent.id
    )
    record = tmp_path / "runs" / post.parent.id / "config.json"
    rec = json.loads(record.read_text())
    ours, rec["data_fingerprint"] = rec["data_fingerprint"], "0123456789abcdef"
    record.write_text(json.dumps(rec))  # as if the parent had read other stores
    with pytest.raises(experiment.GraphFailed) as e:
        experiment.run(default.get_config("smoke"), str(tmp_path), only=post.id)
    why = e.value.failures[post.id]
    assert f"parent {post.parent.id} trained on data 0123456789abcdef" in why and ours in why
    assert list((tmp_path / "runs" / post.id).glob("ckpt/*")) == []  # nothing trained


# main.py, SIGKILLed by itself at the n-th write-open of a path matching a pattern
# ("open|REGEX|N", seen by an audit hook) or at the n-th call of a function
# ("call|MODULE:FUNCTION|N"): real kills at points a signal from outside cannot aim at.
_KILL_AT = """
import importlib, os, re, runpy, signal, sys
kind, what, nth = os.environ["RJ_KILL"].split("|")
seen = [0]

def hit():
    seen[0] += 1
    if seen[0] == int(nth):
        os.kill(os.getpid(), signal.SIGKILL)

if kind == "open":
    pattern, write = re.compile(what), os.O_WRONLY | os.O_RDWR | os.O_CREAT

    def hook(event, args):
        if event == "open" and isinstance(args[0], str) and pattern.search(args[0]):
            if (args[1] and any(c in args[1] for c in "wax+")) or (args[2] or 0) & write:
                hit()

    sys.addaudithook(hook)
else:
    module, name = what.split(":")
    m = importlib.import_module(module)
    original = getattr(m, name)

    def wrapped(*a, **k):
        hit()
        return original(*a, **k)

    setattr(m, name, wrapped)
sys.argv = ["main.py", *sys.argv[1:]]
runpy.run_path("main.py", run_name="__main__")
"""


def _killed_at(point: str, workdir: str, *flags: str) -> tuple[int, str, float]:
    cmd = [sys.executable, "-c", _KILL_AT, "--config=configs/default.py:smoke"]
    t = time.monotonic()
    proc = subprocess.run(
        [*cmd, f"--workdir={workdir}", *flags],
        cwd=ROOT,
        env=dict(os.environ, RJ_KILL=point),
        capture_output=True,
        text=True,
        timeout=600,
    )
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - t


@pytest.mark.slow
def test_sigkill_at_six_points_then_the_rerun_is_bit_identical(smoke_workdir, tmp_path):
    """One pretraining node killed in turn during data preparation, mid-step, during a
    checkpoint save, mid-evaluation and while writing result.json; then the graph killed
    while writing results.jsonl. Each rerun goes on; the end equals the uninterrupted run."""
    node = _node("pretrain")
    workdir = str(tmp_path / "w")
    flags = (f"--only={node.id}", "--config.ckpt.every=4")
    points = {
        "data preparation": r"open|/data_cache/pre-[^/]+/\.tmp-[^/]+/train-|1",
        "checkpoint save": r"open|/ckpt/|3",
        "evaluation": "call|retention_jax.evaluate:losses|1",
        "result.json": r"open|/\.result\.json\.[0-9a-f]+\.tmp$|1",
    }
    rc, out, _ = _killed_at(points.pop("data preparation"), workdir, *flags)
    assert rc == -signal.SIGKILL, out[-3000:]
    (pre,) = [p for p in os.listdir(os.path.join(workdir, "data_cache")) if p.startswith("pre-")]
    assert store.committed(os.path.join(workdir, "data_cache", pre), "train") == []
    proc = _start(workdir, node.id, "--config.ckpt.every=4")  # mid-step: killed from outside
    _wait_for(proc, rf"{node.id} step 8/")
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    for name, point in points.items():
        rc, out, seconds = _killed_at(point, workdir, *flags)
        assert rc == -signal.SIGKILL and "resumed at step" in out, (name, out[-3000:])
        print(f"killed during {name} after {seconds:.1f} s")
        assert stage.read_result(os.path.join(workdir, "runs", node.id)) is None, name
    t = time.monotonic()
    rc, out = _finish(_start(workdir, node.id, "--config.ckpt.every=4"))
    assert rc == 0 and "resumed at step" in out, out[-3000:]
    print(f"rerun after the last kill: {time.monotonic() - t:.1f} s")  # the recovery time
    _same_result(smoke_workdir, workdir, node)

    graph = str(tmp_path / "graph")
    shutil.copytree(smoke_workdir, graph)
    os.remove(os.path.join(graph, experiment.RESULTS))
    rc, out, _ = _killed_at(r"open|/\.results\.jsonl\.[0-9a-f]+\.tmp$|1", graph)
    assert rc == -signal.SIGKILL and not os.path.exists(os.path.join(graph, experiment.RESULTS))
    t = time.monotonic()
    rc, out = _finish(_start(graph, ""))
    assert rc == 0, out[-3000:]
    print(f"rerun after the results.jsonl kill: {time.monotonic() - t:.1f} s")
    rows, ref = (
        [json.loads(x) for x in (epath.Path(w) / experiment.RESULTS).read_text().splitlines()]
        for w in (graph, smoke_workdir)
    )
    assert rows == ref


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB tmpfs (needs mount privileges, as on the reference machine)."""
    path = tmp_path / "disk"
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(path)]).returncode:
        pytest.skip("cannot mount a tmpfs here (no privileges)")
    yield path
    subprocess.run(["umount", "-l", str(path)], check=True)


@pytest.mark.slow
def test_a_disk_full_mid_run_stops_the_graph_and_the_rerun_resumes(smoke_workdir, small_disk):
    node = _node("pretrain")
    workdir = str(small_disk / "w")
    proc = _start(workdir, node.id, "--config.ckpt.every=4")
    _wait_for(proc, rf"{node.id} step 8/")
    proc.send_signal(signal.SIGSTOP)  # fill the disk between two checkpoints
    with open(small_disk / "filler", "wb") as f, pytest.raises(OSError, match="No space"):
        while True:
            f.write(b"\0" * (1 << 20))
            f.flush()
    proc.send_signal(signal.SIGCONT)
    rc, out = _finish(proc)
    assert rc == experiment.EXIT_DISK_FULL, out[-3000:]
    assert (
        f"the work directory is full (OSError: [Errno 28] No space left on device) while {node.id}"
        in out
    )
    assert stage.read_result(os.path.join(workdir, "runs", node.id)) is None
    os.remove(small_disk / "filler")
    rc, out = _finish(_start(workdir, node.id, "--config.ckpt.every=4"))
    assert rc == 0 and "resumed at step" in out, out[-3000:]
    _same_result(smoke_workdir, workdir, node)


def _data_file(item_dir: str) -> str:
    """The largest data file of a checkpoint item (Orbax's OCDBT `d/` files)."""
    files = [os.path.join(r, f) for r, _, fs in os.walk(item_dir) for f in fs]
    return max(
        (f for f in files if os.path.basename(os.path.dirname(f)) == "d"), key=os.path.getsize
    )


def _flip_finite(ckpt: str, step: int, target) -> tuple[str, int]:
    """Flips one bit of the step's parameter data such that Orbax restores it without an
    error as finite values of which some changed: damage that only a checksum can see.
    Tries bytes from the middle of the largest data file on (the values are zstd frames:
    some flips break a frame, some change values to NaN); returns the file and the number
    of values changed."""
    path = _data_file(os.path.join(ckpt, str(step), "params"))
    mngr = checkpoint.manager(ckpt, read_only=True)
    args = ocp.args.Composite(params=ocp.args.StandardRestore(target))
    good = jax.device_get(mngr.restore(step, args=args).params)
    with open(path, "rb") as f:
        data = bytearray(f.read())
    for offset in range(len(data) // 2, len(data) // 2 + 64):
        data[offset] ^= 1
        with open(path, "wb") as f:
            f.write(data)
        try:
            raw = jax.device_get(mngr.restore(step, args=args).params)
        except Exception:  # a broken frame: not the damage sought here
            raw = None
        if raw is not None:
            pairs = list(zip(jax.tree.leaves(raw), jax.tree.leaves(good)))
            changed = sum(int((a != b).sum()) for a, b in pairs)
            if changed and all(np.isfinite(a).all() for a, _ in pairs):
                mngr.close()
                return path, changed
        data[offset] ^= 1
    raise AssertionError(f"no flip in {path} restores as changed finite values")


def _flip_bytes(item_dir: str, nbytes: int = 1000) -> str:
    """Inverts `nbytes` bytes in the middle of the item's largest data file (a disk error)."""
    path = _data_file(item_dir)
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        for k in range(nbytes):
            data[len(data) // 2 + k] ^= 0xFF
        f.seek(0)
        f.write(data)
    return path


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def test_a_flipped_bit_fails_its_checksum_and_the_step_is_set_aside(tmp_path):
    """A real bit flip in an Orbax data file, which Orbax restores as wrong finite values
    without a word: the checksums name the step, the item and the array, and the step is
    set aside so that the resumed run can save it again. Then 1,000 inverted bytes."""
    mesh = sharding.make_mesh(dict(data=1, fsdp=8, tensor=1))
    w = jax.random.normal(jax.random.key(0), (256, 1024))
    params = {"w": jax.device_put(w, NamedSharding(mesh, P("fsdp", None)))}
    opt = {"step": jax.device_put(np.int32(7), NamedSharding(mesh, P()))}
    it = iter(grain.MapDataset.range(100).to_iter_dataset())
    ckpt = str(tmp_path / "ckpt")
    mngr = checkpoint.manager(ckpt)
    for step in (4, 8):
        checkpoint.save(mngr, step, params=params, optimizer=opt, data_iter=it, meta={})
    mngr.wait_until_finished()
    t = time.perf_counter()
    for _ in range(10):
        checkpoint.checksums(params)
    print(f"checksums of 1 MiB of parameters: {(time.perf_counter() - t) * 100:.2f} ms")

    _, changed = _flip_finite(ckpt, 8, _abstract(params))
    assert changed >= 1
    with pytest.raises(checkpoint.Damaged) as e:
        checkpoint.restore_params(ckpt, 8, _abstract(params))
    assert str(e.value) == (
        f"{ckpt}/8/params: 1 of 1 arrays differ from the checksums saved with them (['w'])"
    )
    assert os.path.isdir(os.path.join(ckpt, "8"))  # a read-only restore moves nothing

    targets = dict(params=_abstract(params), optimizer=_abstract(opt), data_iter=it)
    with pytest.raises(checkpoint.Damaged) as e:
        checkpoint.restore(mngr, 8, **targets)
    assert str(e.value).endswith(f"(['w']); set aside as {ckpt}/8{checkpoint.DAMAGED}")
    assert mngr.all_steps() == [4] and os.path.isdir(f"{ckpt}/8{checkpoint.DAMAGED}")
    restored, _, _ = checkpoint.restore(mngr, 4, **targets)
    np.testing.assert_array_equal(jax.device_get(restored["w"]), np.asarray(w))
    checkpoint.save(mngr, 8, params=params, optimizer=opt, data_iter=it, meta={})
    mngr.wait_until_finished()  # the step saved again, as the resumed run does
    assert mngr.all_steps() == [4, 8]

    _flip_bytes(os.path.join(ckpt, "8", "params"))
    with pytest.raises(checkpoint.Damaged, match=f"^{ckpt}/8/params: 1 of 1 arrays differ"):
        checkpoint.restore_params(ckpt, 8, _abstract(params))


@pytest.mark.slow
def test_a_flipped_bit_in_the_latest_step_falls_back_to_the_step_before(smoke_workdir, tmp_path):
    """A node killed after a periodic save; one bit of that step's parameters flipped
    (finite values): the rerun names the step and array, sets it aside, resumes from the
    step before, saves the same step again and ends bit-identical."""
    node = _node("pretrain")
    workdir = str(tmp_path / "w")
    proc = _start(workdir, node.id, "--config.ckpt.every=4")
    _wait_for(proc, rf"{node.id} step 16/")
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    ckpt = os.path.join(workdir, "runs", node.id, "ckpt")
    *_, previous, latest = checkpoint.manager(ckpt).all_steps()
    _flip_finite(ckpt, latest, _shapes(node))

    t = time.monotonic()
    rc, out = _finish(_start(workdir, node.id, "--config.ckpt.every=4"))
    assert rc == 0, out[-3000:]
    print(f"rerun after a flipped bit in the latest step: {time.monotonic() - t:.1f} s")
    assert f"{ckpt}: step {latest} cannot be restored (Damaged: {ckpt}/{latest}/params: 1 of" in out
    assert f"set aside as {ckpt}/{latest}{checkpoint.DAMAGED}); trying the one before" in out
    assert f"resumed at step {previous}" in out and "NonFinite" not in out
    _same_result(smoke_workdir, workdir, node)
    assert os.path.isdir(os.path.join(ckpt, f"{latest}{checkpoint.DAMAGED}"))  # kept to inspect


def _matched(lam: float) -> graph.Node:
    nodes = experiment.expand(default.get_config("smoke"))
    return next(
        n
        for n in nodes
        if n.stage == "posttrain"
        and n.exp.posttrain.compute_matched
        and n.exp.pretrain.exposure.lam == lam
    )


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["one finite bit", "1000 bytes"])
def test_a_damaged_parent_result_fails_the_child_naming_parent_step_and_remedy(
    smoke_workdir, tmp_path, damage
):
    """The child (the compute-matched post-training node at λ = 0: one step) fails before
    training, naming the parent, its result step, the damaged item and the remedy; never
    a non-finite loss. Following the remedy gives the undamaged results."""
    post = _matched(0.0)
    parent_dir = str(tmp_path / "runs" / post.parent.id)
    shutil.copytree(os.path.join(smoke_workdir, "runs", post.parent.id), parent_dir)
    ckpt = os.path.join(parent_dir, "ckpt")
    step = stage.read_result(parent_dir)["result_step"]
    if damage == "one finite bit":
        _flip_finite(ckpt, step, _shapes(post.parent))
    else:
        _flip_bytes(os.path.join(ckpt, str(step), "params"))

    rc, out = _finish(_start(str(tmp_path), post.id))
    assert rc == 1, out[-3000:]
    assert (
        f"parent {parent_dir} finished, but its result step {step} cannot be restored from "
        f"{ckpt} (Damaged: {ckpt}/{step}/params: " in out
    )
    assert "differ from the checksums saved with them" in out
    assert f"rerun the parent: remove {parent_dir}/{stage.RESULT} and run the same command" in out
    assert "NonFinite" not in out
    assert list((tmp_path / "runs" / post.id).glob("ckpt/*")) == []  # nothing trained
    if damage != "one finite bit":
        return
    os.remove(os.path.join(parent_dir, stage.RESULT))  # the remedy
    t = time.monotonic()
    proc = _start(str(tmp_path), f"{post.parent.id},{post.id}", "--retry_failed")
    rc, out = _finish(proc, timeout=900)
    assert rc == 0, out[-3000:]
    print(f"the parent and the child rerun after the remedy: {time.monotonic() - t:.1f} s")
    assert f"set aside as {ckpt}/{step}{checkpoint.DAMAGED}" in out
    _same_result(smoke_workdir, str(tmp_path), post.parent)
    _same_result(smoke_workdir, str(tmp_path), post)
