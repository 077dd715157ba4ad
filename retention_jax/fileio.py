"""Atomic file I/O for local and remote (gs://) paths, and the project's content digest.

Every file a reader may open while a writer runs (results, run records, figures) goes
through a temporary file and a rename, so readers never see half a file.
"""

import hashlib
import json
import uuid
from typing import Any

from etils import epath


def write_bytes(path: str, data: bytes) -> None:
    target = epath.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{uuid.uuid4().hex}.tmp"
    try:
        tmp.write_bytes(data)
        tmp.replace(target)
    finally:
        if tmp.exists():  # a failed write leaves no temporary file behind
            tmp.unlink()


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=1, sort_keys=True))


def read_text(path: str) -> str | None:
    p = epath.Path(path)
    return p.read_text() if p.exists() else None


def read_json(path: str) -> Any | None:
    text = read_text(path)
    return None if text is None else json.loads(text)


def digest(obj: Any, size: int = 6) -> str:
    """Hex digest (2·size characters) of an object's canonical JSON: ids and fingerprints."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=size).hexdigest()


def as_stored(obj: Any) -> Any:
    """`obj` as a JSON file holds it (tuples become lists, other values strings), so a
    record compares equal to the one read back."""
    return json.loads(json.dumps(obj, default=str))
