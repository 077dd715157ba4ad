"""TensorBoard event files from TensorBoard's own protos and record format, without TensorFlow.

Events are `tensorboard.compat.proto` messages, framed as TFRecords by TensorBoard's
`RecordWriter` and read back by its pure-Python record reader. TensorBoard's
`EventFileWriter` is not used: it opens its file through `tensorboard.compat.tf`,
which imports TensorFlow whenever it is installed (the tf, tfds and seqio extras):
7.5 s and 0.9 GB more in every training process, measured (docs/instruments.md).
What stays here is the file: writes are synchronous (no background thread) and go
through `etils.epath`, so a run directory on gs:// works like a local one: local files
are appended at each flush, remote files (which cannot be appended) are rewritten whole.
Only process 0 should write; choosing it is the caller's job.

Resume without duplicated steps: a run restarted from its checkpoint at step `s` opens
the writer with `start_step=s`. The writer copies the events of steps <= s from the
earlier event files into one fresh file, then deletes those files, so no reader (the
Python event loader or TensorBoard's Rust data server) sees the steps in (s, crash] of
the interrupted attempt next to their re-run. TensorBoard's own purge marker (a
`SessionLog.START` event) is not relied on: not every reader honours it. Should a job
die between writing the fresh file and deleting the old ones, the next open compacts
again, taking each step from the last file that holds it. Scalars for steps <= s are
dropped: they are already in the log. Tags under `final/` belong to the attempt that
finishes the run (its last evaluation, whatever step it names): `write_final` always
writes them and compaction drops earlier attempts' copies.
"""

import math
import numbers
import socket
import time
from collections.abc import Iterator, Mapping

from etils import epath
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.compat.tensorflow_stub import errors, pywrap_tensorflow
from tensorboard.plugins.text import summary_v2 as text_summary
from tensorboard.summary.writer.record_writer import RecordWriter

FILE_PREFIX = "events.out.tfevents."
FINAL = "final/"
_FILE_VERSION = "brain.Event:2"


def read_records(path: str) -> Iterator[bytes]:
    """The records of one event file; a truncated last record (a crash mid-write) ends it."""
    reader = pywrap_tensorflow.PyRecordReader_New(path)
    while True:
        try:
            reader.GetNext()
        except errors.OutOfRangeError:
            return
        except errors.DataLossError as e:
            if "truncated record" in e.message:
                return
            raise ValueError(f"{path}: corrupt event record ({e.message})") from e
        yield reader.record()


def event_files(log_dir: str) -> list[str]:
    """Event files of `log_dir` in the order TensorBoard loads them (by name)."""
    d = epath.Path(log_dir)
    return sorted(str(p) for p in d.glob(FILE_PREFIX + "*")) if d.exists() else []


def read_scalars(log_dir: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of `log_dir` as tag -> [(step, value)] in file order (for checks)."""
    out: dict[str, list[tuple[int, float]]] = {}
    for path in event_files(log_dir):
        for data in read_records(path):
            e = event_pb2.Event.FromString(data)
            for v in e.summary.value:
                if v.WhichOneof("value") == "simple_value":
                    out.setdefault(v.tag, []).append((e.step, v.simple_value))
    return out


def _history(paths: list[str], last_step: int) -> list[bytes]:
    """Summary events of steps <= last_step but no `final/` ones, each step from the last
    file holding it."""
    by_step: dict[int, tuple[int, list[bytes]]] = {}
    for i, path in enumerate(paths):
        for data in read_records(path):
            e = event_pb2.Event.FromString(data)
            if not e.HasField("summary") or e.step > last_step:
                continue
            if any(v.tag.startswith(FINAL) for v in e.summary.value):
                continue
            if e.step not in by_step or by_step[e.step][0] < i:
                by_step[e.step] = (i, [])
            by_step[e.step][1].append(data)
    return [d for step in sorted(by_step) for d in by_step[step][1]]


class _EventFile:
    """The file `RecordWriter` writes to: records wait in memory until `flush` makes them
    durable (appended to a local file; a remote one is rewritten whole)."""

    def __init__(self, path: epath.Path):
        self.path, self.remote = path, "://" in str(path)
        self.written, self.pending = bytearray(), bytearray()

    def write(self, data: bytes) -> None:
        self.pending += data

    def flush(self) -> None:
        if not self.pending and self.path.exists():
            return
        if self.remote:
            self.written += self.pending
            self.path.write_bytes(bytes(self.written))
        else:
            with self.path.open("ab") as f:
                f.write(bytes(self.pending))
        self.pending.clear()

    def close(self) -> None:
        self.flush()


class SummaryWriter:
    """Scalars and text of one run as a TensorBoard event file in `log_dir`.

    `start_step` is the step the run resumed from (0 for a fresh run, -1 to replace
    every earlier event); see the module docstring for how earlier attempts' events are
    superseded.
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
        self._records = RecordWriter(_EventFile(self.path))
        self._put(event_pb2.Event(file_version=_FILE_VERSION))
        for data in _history(old, self.start_step):
            self._records.write(data)
        self.flush()
        for path in old:
            epath.Path(path).unlink()

    def _put(self, event: event_pb2.Event) -> None:
        event.wall_time = time.time()
        self._records.write(event.SerializeToString())

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Queues one event holding every scalar of `step`; steps <= start_step are dropped."""
        if step > self.start_step:
            self.write_final(step, scalars)

    def write_final(self, step: int, scalars: Mapping[str, float]) -> None:
        """Queues `scalars` at `step` whatever the start step (tags under `final/`)."""
        values = [summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in scalars.items()]
        self._put(event_pb2.Event(step=int(step), summary=summary_pb2.Summary(value=values)))

    def write_text(self, step: int, tag: str, text: str) -> None:
        """Queues `text` (Markdown) for TensorBoard's Text tab."""
        self._put(event_pb2.Event(step=int(step), summary=text_summary.text_pb(tag, text)))

    def flush(self) -> None:
        """Makes every queued event durable in the event file."""
        self._records.flush()

    def close(self) -> None:
        self._records.close()


def _numbers(tree, prefix: str) -> Iterator[tuple[str, float]]:
    """(tag, value) of every finite number in a nested dict, tags joined by '/'."""
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            yield from _numbers(v, f"{prefix}/{k}")
    elif isinstance(tree, numbers.Real) and math.isfinite(tree):
        yield prefix, float(tree)


def write_summary(log_dir: str, summary: Mapping, text: str = "") -> None:
    """A graph's summary (a nested dict; its numbers become scalars at step 0 under
    `summary/...`) and its printed form as text; replaces what `log_dir` held."""
    w = SummaryWriter(log_dir, start_step=-1)
    w.write_scalars(0, dict(_numbers(summary, "summary")))
    if text:
        w.write_text(0, "summary", f"```\n{text}\n```")
    w.close()
