"""Prepared token stores: one domain's packed sequences in committed, checksummed shards.

A store is a directory under the data root (local or gs://), named
`<domain>-<name>-<content>`, where `content` hashes everything that decides its tokens:

  manifest.json          source and its fingerprint (full file contents, or the hub commit
                         read), tokenizer and its fingerprint, seq_len, packing,
                         val_fraction, data.seed, the blocking and the sampling rule.
                         Written once, before any shard.
  train/00000000.npy     shard j: the packed training rows of the store's block j
  train/00000000.json    its entry: documents, sequences, target tokens, bytes, blake2b
  val/...                the same for validation
  train/index.json       every committed entry in one file (written after a prepare)

Blocks and sampling. The store's block j is source block order(j), where `order` is a
permutation of the source's blocks seeded by data.seed (sources.py defines the blocks, a
few MiB of documents each). The sequences of a split are its shards' rows in block
order, so the first P sequences of a store — the D_post or D_ft pool of a stage plan —
are a seeded random sample of blocks drawn from the whole source, not the first
documents of its stream order (which on the hub is grouped by sub-source). A
sequential source (a `datasets` stream, seqio) has no random access: its blocks are in
stream order.

Split. A document is validation iff blake2b(key) / 2^64 < val_fraction — a hash band of
its key, so train and validation are disjoint by construction, the same for every seed
and every run. The validation set is the first val_tokens // seq_len validation
sequences. A block's train and validation shards are prepared separately, so a store
read only for validation packs no training documents.

Rows. concat: the block's documents of one split, each ending in EOS, in one flat token
array; row i is tokens [i*seq_len, i*seq_len + seq_len + 1) (rows overlap by one token,
so every token after the first is a target once); the tail shorter than a row is
dropped. first_fit: [rows, 4, seq_len] (inputs, targets, segment ids, positions), packed
within the block (packing.py).

Commit and integrity. A shard is written aside, then renamed into place, then its entry
is written (atomically): a shard exists once its entry does. A split holds the
contiguous run of committed shards from 0, so a killed prepare resumes from them and
ends with the store an uninterrupted one writes. Opening a store reads every entry and
checks each shard's size; a local shard's checksum is checked before its first row is
read (once per process), and prepare checks every checksum of a store it extends or is
asked to verify. A mismatch names the shard.
"""

import hashlib
import json
import threading

import numpy as np
from etils import epath

from retention_jax import fileio
from retention_jax.config import DOMAINS
from retention_jax.data import packing as packing_lib

VERSION = "store-v2"
SPLITS = ("train", "val")
INDEX = "index.json"


class StoreError(ValueError):
    """A store is missing, incomplete or damaged; the message names it and the fix."""


def is_val(keys: list[str], val_fraction: float) -> np.ndarray:
    """Hash band of document keys: True where the document belongs to validation."""
    h = [
        int.from_bytes(
            hashlib.blake2b(k.encode(), digest_size=8, person=b"split-v1").digest(), "little"
        )
        for k in keys
    ]
    return np.asarray(h, dtype=np.float64) / 2.0**64 < val_fraction


def shard_name(j: int) -> str:
    return f"{j:08d}"


def checksum(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def committed(path: str, split: str) -> list[dict]:
    """Entries of the contiguous committed shards 0, 1, ... of `split`: those the split's
    index holds (one read, where a store has thousands of shards on gs://), then any
    committed after it."""
    d = epath.Path(path) / split
    if not d.exists():
        return []
    names = {p.name for p in d.iterdir()}
    out = []
    for e in json.loads((d / INDEX).read_text()) if INDEX in names else []:
        if f"{shard_name(e['shard'])}.json" not in names:  # removed since: not committed
            break
        out.append(e)
    while f"{shard_name(len(out))}.json" in names:
        out.append(json.loads((d / f"{shard_name(len(out))}.json").read_text()))
    return out


def write_index(path: str, split: str, entries: list[dict]) -> None:
    """All entries of a split in one file (a cache of them: the entries stay the truth)."""
    if entries:
        fileio.write_json(str(epath.Path(path) / split / INDEX), entries)


def verify(path: str, entries: dict[str, list[dict]]) -> None:
    """Checks every shard's checksum against its entry."""
    for split, es in entries.items():
        for e in es:
            f = epath.Path(path) / split / f"{shard_name(e['shard'])}.npy"
            if checksum(f.read_bytes()) != e["blake2b"]:
                raise StoreError(
                    f"store shard {f} is damaged (its checksum differs from its entry); "
                    f"remove {f.with_suffix('.json')} and prepare again to rebuild it"
                )


class _Shard:
    """One shard's rows: memory-mapped when local, read by byte range when remote."""

    def __init__(self, path: epath.Path, entry: dict, packing: str, seq_len: int):
        self.path, self.entry, self.packing, self.seq_len = path, entry, packing, seq_len
        self.local = "://" not in str(path)
        self._array, self._lock = None, threading.Lock()

    def _open(self):
        with self._lock:
            if self._array is not None:
                return self._array
            if self.local:
                with open(self.path, "rb") as f:
                    if checksum(f.read()) != self.entry["blake2b"]:
                        raise StoreError(
                            f"store shard {self.path} is damaged (its checksum differs from "
                            "its entry); prepare the store again to rebuild it"
                        )
                self._array = np.load(self.path, mmap_mode="r")
            else:
                self._array = _RemoteArray(self.path)
            return self._array

    def rows(self, idx: np.ndarray) -> np.ndarray:
        """Rows `idx`: [n, seq_len + 1] tokens (concat) or [n, 4, seq_len] (first_fit)."""
        a, s = self._open(), self.seq_len
        if self.packing == "concat":
            if self.local:  # one vectorised gather from the memory map
                return np.asarray(a[idx[:, None] * s + np.arange(s + 1)])
            return np.stack([a[i * s : i * s + s + 1] for i in idx])
        return np.asarray(a[idx]) if self.local else np.stack([a[i] for i in idx])


class _RemoteArray:
    """A .npy file on a remote store, sliced along its first axis by range reads."""

    def __init__(self, path: epath.Path):
        self.path = path
        with path.open("rb") as f:
            fmt = np.lib.format
            major, _ = fmt.read_magic(f)
            read = fmt.read_array_header_1_0 if major == 1 else fmt.read_array_header_2_0
            shape, _, dtype = read(f)
            self.offset = f.tell()
        self.shape, self.dtype = shape, dtype
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize

    def __getitem__(self, key) -> np.ndarray:
        lo, hi = (
            (key.start, min(key.stop, self.shape[0])) if isinstance(key, slice) else (key, key + 1)
        )
        with self.path.open("rb") as f:
            f.seek(self.offset + lo * self.row_bytes)
            buf = f.read((hi - lo) * self.row_bytes)
        out = np.frombuffer(buf, self.dtype).reshape((hi - lo, *self.shape[1:]))
        return out if isinstance(key, slice) else out[0]


class DomainStore:
    """One domain's train and validation sequences, read across its shards."""

    def __init__(self, path: str, val_sequences: int, entries: dict | None = None):
        """`entries`: the committed entries per split when the caller has read them."""
        self.path = path
        root = epath.Path(path)
        text = fileio.read_text(str(root / "manifest.json"))
        if text is None:
            raise StoreError(f"no store at {path} (manifest.json missing)")
        self.static = json.loads(text)
        self.seq_len, self.packing = self.static["seq_len"], self.static["packing"]
        self.content = self.static["content"]
        self.entries = entries or {s: committed(path, s) for s in SPLITS}
        self._shards, self._starts = {}, {}
        for split, es in self.entries.items():
            shards = []
            for e in es:
                f = root / split / f"{shard_name(e['shard'])}.npy"
                size = f.stat().length if f.exists() else -1
                if size != e["bytes"]:
                    raise StoreError(
                        f"store shard {f} is damaged or missing ({size} bytes; its entry "
                        f"says {e['bytes']}); prepare the store again to rebuild it"
                    )
                shards.append(_Shard(f, e, self.packing, self.seq_len))
            self._shards[split] = shards
            self._starts[split] = np.cumsum([0] + [e["sequences"] for e in es])
        have_val = int(self._starts["val"][-1])
        self.num_sequences = {"train": int(self._starts["train"][-1]), "val": val_sequences}
        if have_val < val_sequences:
            raise StoreError(
                f"store {path} holds {have_val} validation sequences, {val_sequences} needed"
            )

    @property
    def manifest(self) -> dict:
        """The static manifest with the counts of the committed shards."""
        counts = {
            split: {
                "shards": len(es),
                "sequences": int(sum(e["sequences"] for e in es)),
                "target_tokens": int(sum(e["target_tokens"] for e in es)),
                "documents_read": int(sum(e["documents"] for e in es)),
            }
            for split, es in self.entries.items()
        }
        return {**self.static, **counts}

    def rows(self, split: str, idx: np.ndarray) -> dict:
        """Sequences `idx` of `split` as int32 arrays [len(idx), seq_len] (KEYS)."""
        idx = np.asarray(idx, dtype=np.int64)
        starts, s = self._starts[split], self.seq_len
        if idx.size and (idx.min() < 0 or idx.max() >= starts[-1]):
            raise IndexError(f"{split} sequences of {self.path}: index out of [0, {starts[-1]})")
        which = np.searchsorted(starts, idx, side="right") - 1
        n = len(idx)
        if self.packing == "concat":
            chunk = np.zeros((n, s + 1), np.int32)
        else:
            chunk = np.zeros((n, len(packing_lib.KEYS), s), np.int32)
        for w in np.unique(which):
            sel = np.nonzero(which == w)[0]
            chunk[sel] = self._shards[split][w].rows(idx[sel] - starts[w])
        if self.packing == "concat":
            return {
                "inputs": chunk[:, :-1],
                "targets": chunk[:, 1:],
                "segment_ids": np.ones((n, s), np.int32),
                "positions": np.broadcast_to(np.arange(s, dtype=np.int32), (n, s)).copy(),
            }
        return {k: chunk[:, i] for i, k in enumerate(packing_lib.KEYS)}


class Corpus:
    """The prepared stores of the three domains and their tokenizer."""

    def __init__(self, tokenizer, stores: dict, seq_len: int, packing: str):
        self.tokenizer, self.stores = tokenizer, stores
        self.seq_len, self.packing = seq_len, packing
        self.vocab_size = int(tokenizer.vocab_size)
        parts = [tokenizer.fingerprint, seq_len, packing] + [
            [stores[d].content, stores[d].num_sequences["val"]] for d in DOMAINS
        ]
        self.fingerprint = fileio.digest(parts, 8)

    def manifests(self) -> dict:
        return {d: self.stores[d].manifest for d in DOMAINS}


def needs_of(plans) -> dict[str, int]:
    """Train sequences per domain that a set of StagePlans reads."""
    need = {d: 0 for d in DOMAINS}
    for p in plans:
        for d, n in p.needs.items():
            need[d] = max(need[d], n)
    return need
