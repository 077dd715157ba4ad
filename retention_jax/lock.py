"""One owner per run directory: an exclusive lock file with a heartbeat.

Two jobs training the same node would interleave checkpoints and clobber each other's
results, so a run directory is owned by one job at a time. The owner creates
`<run_dir>/LOCK` with create-if-absent semantics, holding its owner id, host, pid and
heartbeat time; it rewrites the heartbeat at sync points (`heartbeat()`) or from a
daemon thread, and removes the file on release. A second job gets `RunLocked` naming
the owner. A lock whose owner is gone (its pid is dead on this host, or its heartbeat is
older than `timeout_s`) is taken over with a warning.

Atomicity. Local disks: the record is written aside and hard-linked into place, which
creates the lock whole or fails if one exists; a heartbeat is a write aside and a
rename; a takeover renames the stale file away (atomic) and checks that what it moved
is the record it judged stale, so two contenders never both win. Remote stores
(gs://, any fsspec URL) go through fsspec, as etils.epath does for gs:// (epath itself
has no exclusive-create mode): creation opens the object in mode "xb", which gcsfs
sends as an upload with the precondition `ifGenerationMatch=0`; Cloud Storage applies
it atomically and answers 412 (raised as FileExistsError) to every creator but one. A
heartbeat is one object overwrite (atomic on Cloud Storage). A takeover there is a
copy and a delete, not a rename: two contenders taking over the same stale lock within
one request round trip can both believe they won; the loser finds out at its next
`heartbeat()` (`LockLost`), so the overlap is bounded by one heartbeat period.
"""

import atexit
import dataclasses
import json
import logging
import os
import socket
import threading
import time
import uuid

LOCK = "LOCK"


class RunLocked(RuntimeError):
    """Another live job owns the run directory."""


class LockLost(RuntimeError):
    """This job's lock was taken over (its heartbeat had gone stale)."""


@dataclasses.dataclass(frozen=True)
class Owner:
    id: str
    host: str
    pid: int
    heartbeat: float  # unix seconds of the last refresh

    def age(self) -> float:
        return time.time() - self.heartbeat

    def describe(self) -> str:
        return (
            f"owner {self.id} on host {self.host} pid {self.pid}, heartbeat {self.age():.0f}s ago"
        )


class _Files:
    """The few file operations the lock needs, with their atomicity on each kind of store."""

    def __init__(self, url: str):
        self.remote = "://" in url
        if self.remote:
            import fsspec

            self.fs, _ = fsspec.core.url_to_fs(url)

    def mkdir(self, path: str) -> None:
        if self.remote:
            self.fs.makedirs(path, exist_ok=True)
        else:
            os.makedirs(path, exist_ok=True)

    def create(self, path: str, text: str) -> bool:
        """Writes `text` to `path` if nothing is there; False if something is.

        Atomic and whole: a local file is written aside and hard-linked into place
        (link fails if the name exists); a remote object appears in one upload.
        """
        if self.remote:
            try:
                with self.fs.open(path, "xb") as f:
                    f.write(text.encode())
            except FileExistsError:
                return False
            return True
        tmp = self._write_aside(path, text)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            os.remove(tmp)
        return True

    @staticmethod
    def _write_aside(path: str, text: str) -> str:
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def read(self, path: str) -> str | None:
        try:
            if self.remote:
                return self.fs.cat_file(path).decode()
            with open(path) as f:
                return f.read()
        except FileNotFoundError:
            return None

    def overwrite(self, path: str, text: str) -> None:
        if self.remote:
            self.fs.pipe_file(path, text.encode())  # one object write: atomic
            return
        os.replace(self._write_aside(path, text), path)

    def rename(self, src: str, dst: str) -> bool:
        """Moves `src` to `dst`; False if `src` is gone."""
        try:
            if self.remote:
                self.fs.mv(src, dst)
            else:
                os.rename(src, dst)
        except FileNotFoundError:
            return False
        return True

    def remove(self, path: str) -> None:
        try:
            if self.remote:
                self.fs.rm_file(path)
            else:
                os.remove(path)
        except FileNotFoundError:
            pass


def read_owner(run_dir: str) -> Owner | None:
    """The current owner recorded in `run_dir`, or None when it is unlocked."""
    return _read(_Files(run_dir), _join(run_dir, LOCK))


def _join(run_dir: str, name: str) -> str:
    return f"{run_dir.rstrip('/')}/{name}"


def _read(files: _Files, path: str) -> Owner | None:
    got = files.read(path)
    if got is None:
        return None
    return Owner(**json.loads(got))


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host: a dead one's lock or temporary files are
    stale at once, without waiting for a timeout."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class RunLock:
    """The exclusive lock of one run directory (local path or URL); a context manager.

    `timeout_s` is how old a heartbeat may be before the lock counts as abandoned; the
    owner must refresh well within it (`heartbeat()` or `start_heartbeat()`).
    """

    def __init__(self, run_dir: str, *, timeout_s: float = 600.0):
        if timeout_s <= 0:
            raise ValueError(f"lock timeout_s={timeout_s}: allowed a positive number of seconds")
        self.run_dir = os.fspath(run_dir)
        self.path = _join(self.run_dir, LOCK)
        self.timeout_s = timeout_s
        self.owner = Owner(uuid.uuid4().hex[:12], socket.gethostname(), os.getpid(), 0.0)
        self.held = False
        self._files = _Files(self.run_dir)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._io = threading.Lock()  # heartbeat thread vs. release

    def _record(self) -> str:
        self.owner = dataclasses.replace(self.owner, heartbeat=time.time())
        return json.dumps(dataclasses.asdict(self.owner))

    def stale(self, other: Owner) -> bool:
        """Whether `other` has gone: dead pid on this host, or a heartbeat past the timeout."""
        if other.host == self.owner.host and other.pid > 0 and not pid_alive(other.pid):
            return True
        return other.age() > self.timeout_s

    def acquire(self) -> "RunLock":
        """Takes the lock, or a stale one over; raises RunLocked if a live job holds it.

        A takeover happens only under a second exclusive file (`LOCK.takeover`), so two
        contenders never both replace a stale lock: the one that cannot create the
        marker waits for the outcome and reads the lock again."""
        self._files.mkdir(self.run_dir)
        marker = _join(self.run_dir, f"{LOCK}.takeover")
        for _ in range(200):
            if self._files.create(self.path, self._record()):
                self.held = True
                atexit.register(self.release)
                return self
            other = _read(self._files, self.path)
            if other is None:
                continue  # released meanwhile
            if not self.stale(other):
                raise RunLocked(f"{self.run_dir} is locked by {other.describe()}")
            if not self._files.create(marker, self._record()):
                time.sleep(0.01)  # another contender is taking it over
                continue
            try:
                if _read(self._files, self.path) == other:  # still the one judged stale
                    self._files.remove(self.path)
                    logging.warning(
                        "%s: taking over a stale lock (%s)", self.path, other.describe()
                    )
            finally:
                self._files.remove(marker)
        raise RunLocked(f"{self.run_dir}: could not take the stale lock over")

    def heartbeat(self) -> None:
        """Refreshes the heartbeat; raises LockLost if another job has taken the lock."""
        with self._io:
            if not self.held:
                return
            now = _read(self._files, self.path)
            if now is None or now.id != self.owner.id:
                self.held = False
                taker = now.describe() if now else "nobody (the file is gone)"
                raise LockLost(f"{self.path} was taken over by {taker}")
            self._files.overwrite(self.path, self._record())

    def start_heartbeat(self, every_s: float | None = None) -> None:
        """Refreshes from a daemon thread every `every_s` (default: a quarter of the timeout)."""
        every = self.timeout_s / 4 if every_s is None else every_s

        def loop():
            while not self._stop.wait(every):
                try:
                    self.heartbeat()
                except LockLost as e:
                    logging.error("%s", e)
                    return

        self._stop.clear()
        self._thread = threading.Thread(target=loop, name="run-lock-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stops the heartbeat and removes the lock file if this job still owns it."""
        self._stop.set()
        atexit.unregister(self.release)
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._io:
            if not self.held:
                return
            self.held = False
            now = _read(self._files, self.path)
            if now is not None and now.id == self.owner.id:
                self._files.remove(self.path)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def acquire_for_job(run_dir: str, *, timeout_s: float = 600.0) -> RunLock | None:
    """Takes the lock for a whole (multi-process) job: process 0 owns it, and every
    process raises `RunLocked` together when it is taken, so none trains alone.

    Returns the held lock on process 0 and None on the others. A collective: call it
    on every process at the same point.
    """
    import jax

    if jax.process_count() == 1:
        return RunLock(run_dir, timeout_s=timeout_s).acquire()
    import numpy as np
    from jax.experimental import multihost_utils

    held, error = None, None
    if jax.process_index() == 0:
        try:
            held = RunLock(run_dir, timeout_s=timeout_s).acquire()
        except RunLocked as e:
            error = e
    if int(multihost_utils.broadcast_one_to_all(np.int32(held is not None))):  # process 0's
        return held
    if error is not None:
        raise error
    owner = read_owner(run_dir)  # the run directory is shared: every process can read it
    raise RunLocked(f"{run_dir} is locked by {owner.describe() if owner else 'another job'}")
