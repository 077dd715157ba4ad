"""Prepared token stores: tokenize a source once into memory-mapped numpy arrays.

A store holds one domain's train and validation sequences (packing.py) plus a
manifest.json (document, token and sequence counts, source and tokenizer fingerprints).
Its directory is `<cache>/<domain>-<name>-<content>-n<train sequences>`, where `content`
hashes everything that decides the tokens (source fingerprint, tokenizer fingerprint,
seq_len, packing, val_fraction, val_tokens). The source is read in order and only until
both splits are full, so a store for n sequences is a prefix of any larger one: a run
reuses any store with at least the sequences it needs, and the content hash (not n) goes
into the corpus fingerprint. Stores are written to a temporary directory and renamed,
so concurrent processes never see half a store; on a pod every host prepares its own.

Split: a document is validation iff blake2b(key) / 2^64 < val_fraction — a hash band of
its key, so train and validation are disjoint by construction and the same for every
run. Validation holds val_tokens // seq_len sequences (the first of the val stream).
"""

import glob
import hashlib
import json
import os
import shutil
import tempfile
import time

import jax
import numpy as np

from retention_jax import fileio
from retention_jax.config import DOMAINS, Data
from retention_jax.data import packing as packing_lib
from retention_jax.data import sources
from retention_jax.data.tokenizer import make_tokenizer

VERSION = "store-v1"


def is_val(keys: list[str], val_fraction: float) -> np.ndarray:
    """Hash band of document keys: True where the document belongs to validation."""
    h = [
        int.from_bytes(
            hashlib.blake2b(k.encode(), digest_size=8, person=b"split-v1").digest(), "little"
        )
        for k in keys
    ]
    return np.asarray(h, dtype=np.float64) / 2.0**64 < val_fraction


class DomainStore:
    """One domain's memory-mapped train and validation sequences."""

    def __init__(self, path: str):
        self.path = path
        with open(os.path.join(path, "manifest.json")) as f:
            self.manifest = json.load(f)
        self.seq_len = self.manifest["seq_len"]
        self.packing = self.manifest["packing"]
        self.content = self.manifest["content"]
        self.arrays = {}
        for split in ("train", "val"):
            names = ("tokens",) if self.packing == "concat" else packing_lib.KEYS
            self.arrays[split] = {
                n: np.load(os.path.join(path, f"{split}_{n}.npy"), mmap_mode="r") for n in names
            }
        self.num_sequences = {s: self.manifest[s]["sequences"] for s in ("train", "val")}

    def rows(self, split: str, idx: np.ndarray) -> dict:
        """Sequences `idx` of `split` as int32 arrays [len(idx), seq_len]."""
        idx = np.asarray(idx, dtype=np.int64)
        s, arr = self.seq_len, self.arrays[split]
        if self.packing == "concat":
            chunk = np.asarray(arr["tokens"][idx[:, None] * s + np.arange(s + 1)], dtype=np.int32)
            n = len(idx)
            return {
                "inputs": chunk[:, :-1],
                "targets": chunk[:, 1:],
                "segment_ids": np.ones((n, s), np.int32),
                "positions": np.broadcast_to(np.arange(s, dtype=np.int32), (n, s)).copy(),
            }
        return {k: np.asarray(arr[k][idx], dtype=np.int32) for k in packing_lib.KEYS}


def _content_key(src, tok, cfg: Data, domain: str) -> str:
    parts = [
        VERSION,
        src.fingerprint,
        tok.fingerprint,
        cfg.seq_len,
        cfg.packing,
        cfg.val_fraction,
        cfg.val_tokens,
        cfg.domain(domain).text,
    ]
    return fileio.digest(parts, 8)


def _find(cache: str, prefix: str, need: int) -> str | None:
    best = None
    for p in glob.glob(os.path.join(cache, prefix + "-n*")):
        if not os.path.exists(os.path.join(p, "manifest.json")):
            continue
        n = int(p.rsplit("-n", 1)[1])
        if n >= need and (best is None or n < best[0]):
            best = (n, p)
    return best[1] if best else None


class _Progress:
    """A progress bar on one line, redrawn at most every 2 s (process 0 prints it)."""

    def __init__(self, label: str, total: int):
        self.label, self.total, self.last = label, max(total, 1), time.monotonic()
        self.start = self.last

    def _draw(self, n: int, end: str) -> None:
        if jax.process_index() != 0:
            return
        frac = min(n / self.total, 1.0)
        bar = "#" * int(30 * frac)
        rate = n / max(time.monotonic() - self.start, 1e-9)
        print(
            f"\r{self.label} [{bar:<30}] {n:,}/{self.total:,} sequences, {rate:,.0f}/s",
            end=end,
            flush=True,
        )

    def update(self, n: int) -> None:
        if time.monotonic() - self.last >= 2.0:
            self.last = time.monotonic()
            self._draw(n, "")

    def done(self, n: int) -> None:
        self._draw(n, "\n")


def build_store(src, tok, cfg: Data, domain: str, need: int, path_prefix: str) -> str:
    """Tokenize `src` until `need` train and the validation sequences are full; write it."""
    s, pk, frac = cfg.seq_len, cfg.packing, cfg.val_fraction
    n_val = cfg.val_tokens // s
    packers = {"train": packing_lib.make_packer(pk, s), "val": packing_lib.make_packer(pk, s)}
    docs = {"train": 0, "val": 0}
    eos = np.asarray([tok.eos_id], np.int32)
    it = src.documents()
    batch_docs = 256
    exhausted = False
    progress = _Progress(f"preparing data.{domain} ({cfg.domain(domain).name})", need + n_val)
    while packers["train"].sequences() < need or packers["val"].sequences() < n_val:
        progress.update(packers["train"].sequences() + packers["val"].sequences())
        batch = []
        for kv in it:
            batch.append(kv)
            if len(batch) == batch_docs:
                break
        if not batch:
            exhausted = True
            break
        val = is_val([k for k, _ in batch], frac)
        ids = tok.encode_batch([t for _, t in batch])
        for v, doc in zip(val, ids, strict=True):
            split = "val" if v else "train"
            packers[split].add(np.concatenate([doc, eos]))
            docs[split] += 1
    if exhausted:
        for p in packers.values():
            p.flush()
    have = {k: p.sequences() for k, p in packers.items()}
    progress.done(have["train"] + have["val"])
    if docs["train"] + docs["val"] == 0:
        raise ValueError(f"data.{domain}.source={src.spec!r}: the source is empty (no documents)")
    if have["train"] < need or have["val"] < n_val:
        raise ValueError(
            f"data.{domain}.source={src.spec!r}: holds {have['train']} train and "
            f"{have['val']} validation "
            f"sequences of data.seq_len={s}; the plans need {need} train and {n_val} validation "
            f"(data.val_tokens={cfg.val_tokens}, data.val_fraction={frac})"
        )
    dtype = np.uint16 if tok.vocab_size <= 65536 else np.int32
    cache = os.path.dirname(path_prefix)
    os.makedirs(cache, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=cache)
    counts = {}
    for split, n in (("train", need), ("val", n_val)):
        arrays = packers[split].take(n)
        for name, a in arrays.items():
            np.save(
                os.path.join(tmp, f"{split}_{name}.npy"),
                a.astype(dtype if name in ("tokens", "inputs", "targets") else np.int32),
            )
        targets = n * s if pk == "concat" else int((arrays["segment_ids"] > 0).sum())
        counts[split] = {"sequences": n, "target_tokens": targets, "documents_read": docs[split]}
    manifest = {
        "version": VERSION,
        "domain": domain,
        "name": cfg.domain(domain).name,
        "source": src.spec,
        "source_fingerprint": src.fingerprint,
        "tokenizer": tok.spec,
        "tokenizer_fingerprint": tok.fingerprint,
        "eos_id": tok.eos_id,
        "seq_len": s,
        "packing": pk,
        "val_fraction": frac,
        "content": os.path.basename(path_prefix).rsplit("-", 1)[1],
        **counts,
    }
    with open(os.path.join(tmp, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    final = f"{path_prefix}-n{need}"
    try:
        os.rename(tmp, final)
    except OSError:  # another process finished the same store first
        shutil.rmtree(tmp, ignore_errors=True)
    return final


class Corpus:
    """The prepared stores of the three domains and their tokenizer."""

    def __init__(self, tokenizer, stores: dict, seq_len: int, packing: str):
        self.tokenizer, self.stores = tokenizer, stores
        self.seq_len, self.packing = seq_len, packing
        self.vocab_size = int(tokenizer.vocab_size)
        parts = [tokenizer.fingerprint, seq_len, packing] + [stores[d].content for d in DOMAINS]
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


def prepare(cfg: Data, workdir: str, needs: dict[str, int]) -> Corpus:
    """Build or reuse stores holding `needs` train sequences per domain (and validation),
    under cfg.cache_dir or <workdir>/data_cache."""
    if unknown := set(needs) - set(DOMAINS):
        raise ValueError(f"needs={needs!r}: unknown domains {sorted(unknown)}; allowed {DOMAINS}")
    tok = make_tokenizer(cfg.tokenizer)
    cache = cfg.cache_dir or os.path.join(workdir, "data_cache")
    stores = {}
    for d in DOMAINS:
        dom = cfg.domain(d)
        src = sources.open_source(dom, f"data.{d}")
        name = "".join(ch if ch.isalnum() else "_" for ch in dom.name)
        prefix = os.path.join(cache, f"{d}-{name}-{_content_key(src, tok, cfg, d)}")
        need = needs.get(d, 0)
        path = _find(cache, os.path.basename(prefix), need) or build_store(
            src, tok, cfg, d, need, prefix
        )
        stores[d] = DomainStore(path)
    return Corpus(tok, stores, cfg.seq_len, cfg.packing)
