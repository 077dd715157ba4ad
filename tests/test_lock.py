"""The run-directory lock, with real contending and killed processes."""

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from retention_jax import lock

_ROOT = os.path.join(os.path.dirname(__file__), "..")


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.path.abspath(_ROOT)}


_CONTENDER = """
    import os, sys, time
    from retention_jax import lock
    run_dir, go = sys.argv[1], sys.argv[2]
    while not os.path.exists(go):
        time.sleep(0.001)
    try:
        with lock.RunLock(run_dir):
            print("won", os.getpid(), flush=True)
            time.sleep(1.0)
    except lock.RunLocked as e:
        print("locked", e, flush=True)
"""


@pytest.mark.parametrize("stale", [False, True, True])
def test_exactly_one_of_many_contenders_wins(tmp_path, stale):
    """Six processes start at once on a free directory, or on one a dead job left locked."""
    run_dir, go = tmp_path / "run", tmp_path / "go"
    if stale:
        _plant(str(run_dir), "elsewhere", 1, age_s=3600)
    procs = [
        subprocess.Popen(
            [*_python(_CONTENDER), str(run_dir), str(go)],
            stdout=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        for _ in range(6)
    ]
    time.sleep(1.0)  # every contender is waiting on the start file
    go.touch()
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    won = [o for o in outs if o.startswith("won")]
    assert len(won) == 1, outs
    winner_pid = won[0].split()[1]
    for o in outs:
        if o.startswith("locked"):
            assert f"pid {winner_pid}" in o and "heartbeat" in o and "on host" in o, o
    assert sorted(os.listdir(run_dir)) == []  # released: no lock, no leftovers


_HOLDER = """
    import sys, time
    from retention_jax import lock
    l = lock.RunLock(sys.argv[1]).acquire()
    print(l.owner.id, flush=True)
    time.sleep(600)
"""


def test_a_killed_owners_lock_is_taken_over(tmp_path, caplog):
    run_dir = str(tmp_path / "run")
    p = subprocess.Popen(
        [*_python(_HOLDER), run_dir], stdout=subprocess.PIPE, text=True, env=_env()
    )
    dead_id = p.stdout.readline().strip()
    with pytest.raises(lock.RunLocked, match=f"owner {dead_id} .* pid {p.pid},"):
        lock.RunLock(run_dir).acquire()
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    assert lock.read_owner(run_dir).id == dead_id  # SIGKILL leaves the file behind
    with caplog.at_level(logging.WARNING), lock.RunLock(run_dir) as mine:
        assert lock.read_owner(run_dir).id == mine.owner.id
        assert lock.read_owner(run_dir).pid == os.getpid()
    assert f"taking over a stale lock (owner {dead_id}" in caplog.text
    assert os.listdir(run_dir) == []


def test_normal_exit_without_release_removes_the_lock(tmp_path):
    run_dir = str(tmp_path / "run")
    code = "import sys; from retention_jax import lock; lock.RunLock(sys.argv[1]).acquire()"
    subprocess.run([sys.executable, "-c", code, run_dir], check=True, env=_env())
    assert os.listdir(run_dir) == []


def _plant(run_dir, host: str, pid: int, age_s: float) -> None:
    os.makedirs(run_dir, exist_ok=True)
    record = {"id": "other", "host": host, "pid": pid, "heartbeat": time.time() - age_s}
    with open(os.path.join(run_dir, lock.LOCK), "w") as f:
        json.dump(record, f)


def test_another_hosts_lock_is_stale_only_after_the_timeout(tmp_path):
    run_dir = str(tmp_path / "run")
    _plant(run_dir, "elsewhere", 1, age_s=30)
    with pytest.raises(lock.RunLocked) as e:
        lock.RunLock(run_dir, timeout_s=60).acquire()
    assert "owner other on host elsewhere pid 1, heartbeat 30s ago" in str(e.value)
    _plant(run_dir, "elsewhere", 1, age_s=90)
    with lock.RunLock(run_dir, timeout_s=60) as mine:
        assert lock.read_owner(run_dir).id == mine.owner.id


def test_heartbeat_refreshes_and_detects_a_takeover(tmp_path):
    run_dir = str(tmp_path / "run")
    mine = lock.RunLock(run_dir, timeout_s=60).acquire()
    first = lock.read_owner(run_dir).heartbeat
    time.sleep(0.05)
    mine.heartbeat()
    assert lock.read_owner(run_dir).heartbeat > first
    _plant(run_dir, "elsewhere", 1, age_s=0)  # another job took the directory
    with pytest.raises(lock.LockLost, match="taken over by owner other on host elsewhere"):
        mine.heartbeat()
    mine.release()  # not ours any more: left alone
    assert lock.read_owner(run_dir).id == "other"


def test_heartbeat_thread_keeps_the_lock_fresh(tmp_path):
    run_dir = str(tmp_path / "run")
    with lock.RunLock(run_dir, timeout_s=0.4) as mine:
        mine.start_heartbeat(every_s=0.05)
        time.sleep(0.6)  # longer than the timeout: only the thread keeps it fresh
        assert lock.read_owner(run_dir).age() < 0.4
        with pytest.raises(lock.RunLocked):
            lock.RunLock(run_dir, timeout_s=0.4).acquire()
    assert os.listdir(run_dir) == []


def test_fsspec_url_takes_the_remote_path():
    """memory:// runs the gs:// code (fsspec, exclusive "xb" create, object overwrite)."""
    import fsspec

    run_dir = "memory://bucket/runs/node"
    with lock.RunLock(run_dir, timeout_s=60) as mine:
        assert mine._files.remote
        assert lock.read_owner(run_dir).id == mine.owner.id
        with pytest.raises(lock.RunLocked, match=f"pid {os.getpid()}, heartbeat 0s ago"):
            lock.RunLock(run_dir).acquire()
        before = lock.read_owner(run_dir).heartbeat
        time.sleep(0.05)
        mine.heartbeat()
        assert lock.read_owner(run_dir).heartbeat > before
    fs = fsspec.filesystem("memory")
    assert fs.ls("/bucket/runs/node") == []
    stale = {"id": "gone", "host": "elsewhere", "pid": 1, "heartbeat": time.time() - 120}
    fs.pipe_file("/bucket/runs/node/LOCK", json.dumps(stale).encode())
    with lock.RunLock(run_dir, timeout_s=60) as mine:
        assert lock.read_owner(run_dir).id == mine.owner.id
    assert fs.ls("/bucket/runs/node") == []


def test_bad_timeout_is_named():
    with pytest.raises(ValueError, match="timeout_s=0: allowed a positive"):
        lock.RunLock("/tmp/x", timeout_s=0)
