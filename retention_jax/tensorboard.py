"""TensorBoard scalars without TensorFlow: event files written by this module alone.

An event file is a sequence of TFRecords, each holding one serialized `Event` protocol
buffer. Only three messages are ever written (an `Event` with `wall_time`, `step` and
either `file_version` or a `Summary` of `Value`s with `tag` and `simple_value`), so they
are encoded and decoded here in the protobuf wire format; nothing imports a proto
library or a writer package (tensorboardX imports PyTorch whenever it is installed,
seconds of every process start). TensorBoard's own loader reads the files (tests).

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

import dataclasses
import socket
import struct
import time
from collections.abc import Iterator, Mapping

import google_crc32c
from etils import epath

FILE_PREFIX = "events.out.tfevents."
_FILE_VERSION = "brain.Event:2"
# Field numbers of tensorflow/core/util/event.proto and framework/summary.proto.
_EVENT_WALL_TIME, _EVENT_STEP, _EVENT_FILE_VERSION, _EVENT_SUMMARY = 1, 2, 3, 5
_SUMMARY_VALUE = 1
_VALUE_TAG, _VALUE_SIMPLE = 1, 2
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5  # wire types


@dataclasses.dataclass(frozen=True)
class Event:
    """What an event of this module's files holds: a step's scalars, or the file header."""

    wall_time: float
    step: int = 0
    scalars: tuple[tuple[str, float], ...] | None = None  # None: not a summary event
    file_version: str = ""


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 as protobuf encodes it: two's complement, 10 bytes if < 0
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _bytes_field(field: int, data: bytes) -> bytes:
    return _key(field, _LEN) + _varint(len(data)) + data


def encode(event: Event) -> bytes:
    """The `Event` protocol buffer of `event`, serialized."""
    out = _key(_EVENT_WALL_TIME, _I64) + struct.pack("<d", event.wall_time)
    if event.step:
        out += _key(_EVENT_STEP, _VARINT) + _varint(event.step)
    if event.file_version:
        out += _bytes_field(_EVENT_FILE_VERSION, event.file_version.encode())
    if event.scalars is not None:
        values = b"".join(
            _bytes_field(
                _SUMMARY_VALUE,
                _bytes_field(_VALUE_TAG, tag.encode())
                + _key(_VALUE_SIMPLE, _I32)
                + struct.pack("<f", value),
            )
            for tag, value in event.scalars
        )
        out += _bytes_field(_EVENT_SUMMARY, values)
    return out


def _fields(data: bytes) -> Iterator[tuple[int, int | float | bytes]]:
    """(field number, value) of a serialized message: ints, floats or bytes by wire type."""
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        field, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, pos = _read_varint(data, pos)
        elif wire == _I64:
            (value,), pos = struct.unpack_from("<d", data, pos), pos + 8
        elif wire == _I32:
            (value,), pos = struct.unpack_from("<f", data, pos), pos + 4
        elif wire == _LEN:
            n, pos = _read_varint(data, pos)
            value, pos = data[pos : pos + n], pos + n
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, value


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        b = data[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, pos


def decode(data: bytes) -> Event:
    """An event as this module writes it; fields of other events are skipped."""
    wall_time, step, version, scalars = 0.0, 0, "", None
    for field, value in _fields(data):
        if field == _EVENT_WALL_TIME:
            wall_time = value
        elif field == _EVENT_STEP:
            step = value - (1 << 64) if value >> 63 else value
        elif field == _EVENT_FILE_VERSION:
            version = value.decode()
        elif field == _EVENT_SUMMARY:
            scalars = scalars or ()
            for f, v in _fields(value):
                if f == _SUMMARY_VALUE:
                    parts = dict(_fields(v))
                    if _VALUE_SIMPLE in parts:
                        scalars += ((parts[_VALUE_TAG].decode(), parts[_VALUE_SIMPLE]),)
    return Event(wall_time, step, scalars, version)


def masked_crc32c(data: bytes) -> int:
    """TFRecord's checksum: CRC-32C, rotated right by 15 bits, plus a constant."""
    crc = google_crc32c.value(data)
    return ((crc >> 15 | crc << 17) + 0xA282EAD8) & 0xFFFFFFFF


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
            e = decode(data)
            for tag, value in e.scalars or ():
                out.setdefault(tag, []).append((e.step, value))
    return out


def _history(paths: list[str], last_step: int) -> list[bytes]:
    """Summary events of steps <= last_step, each step from the last file holding it."""
    by_step: dict[int, tuple[int, list[bytes]]] = {}
    for i, path in enumerate(paths):
        for data in read_records(path):
            e = decode(data)
            if e.scalars is None or e.step > last_step:
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
        self._put(Event(time.time(), file_version=_FILE_VERSION))
        for data in _history(old, self.start_step):
            self._pending += _record(data)
        self.flush()
        for path in old:
            epath.Path(path).unlink()

    def _put(self, event: Event) -> None:
        self._pending += _record(encode(event))

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Queues one event holding every scalar of `step`; steps <= start_step are dropped."""
        if step <= self.start_step:
            return
        values = tuple((k, float(v)) for k, v in scalars.items())
        self._put(Event(time.time(), int(step), values))

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
