"""TensorBoard scalars without TensorFlow: event files written with tensorboardX's protos.

Writes are synchronous (no background thread) and go through `etils.epath`, so a run
directory on gs:// works like a local one: local files are appended at each flush,
remote files (which cannot be appended) are rewritten whole. Only process 0 should
write; choosing it is the caller's job.

Resume without duplicated steps: a run restarted from its checkpoint at step `s` opens
the writer with `start_step=s`. The writer copies the events of steps <= s from the
earlier event files into one fresh file, then deletes those files, so no reader (the
Python event loader or TensorBoard's Rust data server) sees the steps in (s, crash] of
the interrupted attempt next to their re-run. TensorBoard's own purge marker (a
`SessionLog.START` event) is not relied on: not every reader honours it. Should a job
die between writing the fresh file and deleting the old ones, the next open compacts
again, taking each step from the last file that holds it. Scalars for steps <= s are
dropped: they are already in the log.
"""

import socket
import struct
import time
from collections.abc import Iterator, Mapping

from etils import epath
from tensorboardX.proto.event_pb2 import Event
from tensorboardX.proto.summary_pb2 import Summary
from tensorboardX.record_writer import masked_crc32c

FILE_PREFIX = "events.out.tfevents."
_FILE_VERSION = "brain.Event:2"


def _record(data: bytes) -> bytes:
    """One TFRecord: length, its masked CRC-32C, the data, its masked CRC-32C."""
    header = struct.pack("<Q", len(data))
    return (
        header
        + struct.pack("<I", masked_crc32c(header))
        + data
        + struct.pack("<I", masked_crc32c(data))
    )


def read_records(path: str) -> Iterator[bytes]:
    """The records of one event file; a truncated last record (a crash mid-write) ends it."""
    buf = epath.Path(path).read_bytes()
    pos = 0
    while pos + 12 <= len(buf):
        (n,) = struct.unpack("<Q", buf[pos : pos + 8])
        end = pos + 12 + n + 4
        if end > len(buf):
            return
        data = buf[pos + 12 : pos + 12 + n]
        (crc,) = struct.unpack("<I", buf[end - 4 : end])
        if crc != masked_crc32c(data):
            raise ValueError(f"{path}: corrupt event record at byte {pos}")
        yield data
        pos = end


def event_files(log_dir: str) -> list[str]:
    """Event files of `log_dir` in the order TensorBoard loads them (by name)."""
    d = epath.Path(log_dir)
    return sorted(str(p) for p in d.glob(FILE_PREFIX + "*")) if d.exists() else []


def read_scalars(log_dir: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of `log_dir` as tag -> [(step, value)] in file order (for checks)."""
    out: dict[str, list[tuple[int, float]]] = {}
    for path in event_files(log_dir):
        for data in read_records(path):
            e = Event.FromString(data)
            for v in e.summary.value:
                out.setdefault(v.tag, []).append((e.step, v.simple_value))
    return out


def _history(paths: list[str], last_step: int) -> list[bytes]:
    """Summary events of steps <= last_step, each step from the last file holding it."""
    by_step: dict[int, tuple[int, list[bytes]]] = {}
    for i, path in enumerate(paths):
        for data in read_records(path):
            e = Event.FromString(data)
            if not e.HasField("summary") or e.step > last_step:
                continue
            if e.step not in by_step or by_step[e.step][0] < i:
                by_step[e.step] = (i, [])
            by_step[e.step][1].append(data)
    return [d for step in sorted(by_step) for d in by_step[step][1]]


class SummaryWriter:
    """Scalars of one run as a TensorBoard event file in `log_dir`.

    `start_step` is the step the run resumed from (0 for a fresh run); see the module
    docstring for how earlier attempts' events are superseded.
    """

    def __init__(self, log_dir: str, *, start_step: int = 0):
        self.log_dir = epath.Path(log_dir)
        self.start_step = int(start_step)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        old = event_files(log_dir)
        stem = f"{FILE_PREFIX}{int(time.time()):010d}.{socket.gethostname()}"
        n = 0
        while str(self.log_dir / f"{stem}.{n}") in old:  # a resume within the same second
            n += 1
        self.path = self.log_dir / f"{stem}.{n}"
        self._remote = "://" in str(log_dir)
        self._written = bytearray()  # this file so far (remote files are rewritten whole)
        self._pending = bytearray()
        self._put(Event(wall_time=time.time(), file_version=_FILE_VERSION))
        for data in _history(old, self.start_step):
            self._pending += _record(data)
        self.flush()
        for path in old:
            epath.Path(path).unlink()

    def _put(self, event: Event) -> None:
        self._pending += _record(event.SerializeToString())

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Queues one event holding every scalar of `step`; steps <= start_step are dropped."""
        if step <= self.start_step:
            return
        values = [Summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()]
        self._put(Event(wall_time=time.time(), step=int(step), summary=Summary(value=values)))

    def flush(self) -> None:
        """Makes every queued event durable in the event file."""
        if not self._pending and self.path.exists():
            return
        if self._remote:
            self._written += self._pending
            self.path.write_bytes(bytes(self._written))
        else:
            with self.path.open("ab") as f:
                f.write(bytes(self._pending))
        self._pending.clear()

    def close(self) -> None:
        self.flush()
