"""The prepare step: tokenize and pack a source's blocks into a store, in parallel.

`data.workers` processes (0: one per core) each take a block (sources.py), tokenize the
documents of the splits still wanted, pack them (packing.py) and write the shard aside
with its checksum; the main process commits shards in block order, and stops once every
split holds the sequences the plans need. Memory is one block per worker and a few
in flight, whatever the corpus size. The committed store depends on neither the number
of workers nor on interruptions: block j's shard is a pure function of (source, block
order(j), tokenizer, packing), and exactly the shortest run of blocks that fills each
split is committed. The layout, the sampling rule and the integrity checks are in
store.py.

Training runs with a remote work directory open stores read-only (`build=False`): a
missing or short store is an error that names it and the command that prepares it. A
run with a local work directory prepares what it lacks first.
"""

import concurrent.futures as cf
import multiprocessing
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid

import numpy as np
from etils import epath

from retention_jax import fileio
from retention_jax.config import DOMAINS, Data
from retention_jax.data import packing as packing_lib
from retention_jax.data import sources, store
from retention_jax.data.permute import derive_key, permute
from retention_jax.data.store import SPLITS, Corpus, DomainStore, StoreError
from retention_jax.data.tokenizer import make_tokenizer

ENCODE_BATCH = 256  # documents per tokenizer call
POOL_START_S = 10.0  # work left (in one process) above which starting workers pays
STALE_TMP_S = 3600.0  # a temporary directory this old belongs to a dead prepare


def content_key(src, tok, cfg: Data, domain: str) -> str:
    parts = [
        store.VERSION,
        src.fingerprint,
        tok.fingerprint,
        cfg.seq_len,
        cfg.packing,
        cfg.val_fraction,
        cfg.domain(domain).text,
        cfg.seed,
        [sources.BLOCK_BYTES, sources.TXT_PER_BLOCK, sources.BUILTIN_PER_BLOCK],
        sources.RECORDS_PER_BLOCK,
    ]
    return fileio.digest(parts, 8)


def block_order(src, seed: int, domain: str, j: int) -> int:
    """The source block that is block j of the store (identity for sequential sources)."""
    if src.num_blocks is None:
        return j
    return int(permute(np.asarray([j]), src.num_blocks, derive_key(seed, "blocks", domain))[0])


class _Job:
    """What a worker needs, built once per process (sent to it at start)."""

    def __init__(self, src, tokenizer: str, cfg: Data, out: str):
        self.src, self.tokenizer, self.out = src, tokenizer, out
        self.seq_len, self.packing, self.val_fraction = cfg.seq_len, cfg.packing, cfg.val_fraction
        self._tok = None

    def __getstate__(self):
        return {**self.__dict__, "_tok": None}

    def tok(self):
        if self._tok is None:
            # One core per worker: `data.workers` processes are the parallelism, so the
            # tokenizers library's own threads would only oversubscribe the cores.
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
            self._tok = make_tokenizer(self.tokenizer)
        return self._tok

    def run(self, j: int, block: int, splits: tuple[str, ...], docs=None) -> dict:
        """Tokenizes block `block` (or the given documents) into shard j of `splits`."""
        tok, s = self.tok(), self.seq_len
        eos = np.asarray([tok.eos_id], np.int32)
        parts = {sp: [] for sp in splits}
        n_docs = {sp: 0 for sp in splits}
        it = iter(docs if docs is not None else self.src.read(block))
        while batch := [kv for _, kv in zip(range(ENCODE_BATCH), it)]:
            val = store.is_val([k for k, _ in batch], self.val_fraction)
            for sp in splits:
                texts = [t for (_, t), v in zip(batch, val, strict=True) if v == (sp == "val")]
                for ids in tok.encode_batch(texts) if texts else ():
                    parts[sp].append(np.concatenate([ids, eos]))
                n_docs[sp] += len(texts)
        wide = tok.vocab_size > 65536 or s > 65535
        dtype = np.int32 if wide else np.uint16
        out = {}
        for sp in splits:
            if self.packing == "concat":
                flat = np.concatenate(parts[sp]) if parts[sp] else np.zeros(0, np.int32)
                rows = max(0, (len(flat) - 1) // s)
                array, targets = flat[: rows * s + 1] if rows else flat[:0], rows * s
            else:
                packer = packing_lib.FirstFitPacker(s)
                for d in parts[sp]:
                    packer.add(d)
                packer.flush()
                got = packer.take(packer.sequences())
                array = np.stack([got[k] for k in packing_lib.KEYS], axis=1)
                rows, targets = len(array), int((got["segment_ids"] > 0).sum())
            path = os.path.join(self.out, f"{sp}-{store.shard_name(j)}-{uuid.uuid4().hex}.npy")
            np.save(path, array.astype(dtype))
            with open(path, "rb") as f:
                data = f.read()
            out[sp] = dict(
                tmp=path,
                entry=dict(
                    shard=j,
                    source_block=block,
                    documents=n_docs[sp],
                    sequences=int(rows),
                    target_tokens=int(targets),
                    bytes=len(data),
                    blake2b=store.checksum(data),
                ),
            )
        return out


_WORKER: _Job | None = None


def _init_worker(job: _Job, parent: int) -> None:
    global _WORKER
    _WORKER = job
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()


def _exit_with(parent: int) -> None:
    """Ends this worker once the prepare process is gone (killed: nothing else would; the
    workers share the task queue's pipe, so none of them ever sees it close)."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _run_in_worker(j: int, block: int, splits: tuple[str, ...], docs=None) -> dict:
    return _WORKER.run(j, block, splits, docs)


class _Progress:
    """A progress bar on one line with the rate and an ETA at that rate, redrawn at most
    every 2 s (process 0 prints it)."""

    def __init__(self, label: str, total: int):
        self.label, self.total, self.last = label, max(total, 1), time.monotonic()
        self.start = self.last

    def draw(self, n: int, end: str = "") -> None:
        import jax  # here, not at the top: the workers never draw and never import it

        if jax.process_index() != 0 or (not end and time.monotonic() - self.last < 2.0):
            return
        self.last = time.monotonic()
        bar = "#" * int(30 * min(n / self.total, 1.0))
        rate = n / max(time.monotonic() - self.start, 1e-9)
        eta = f", ETA {(self.total - n) / rate:,.0f}s" if 0 < n < self.total else ""
        print(
            f"\r{self.label} [{bar:<30}] {n:,}/{self.total:,} sequences, {rate:,.0f}/s{eta:<16}",
            end=end,
            flush=True,
        )


def _clean_stale(path: epath.Path) -> None:
    """Removes temporary directories of prepares that died (old, or a dead pid here)."""
    host = socket.gethostname()
    for p in path.glob(".tmp-*"):
        _, h, pid, _ = (p.name.split("-", 3) + ["", "", ""])[:4]
        dead_here = h == host and pid.isdigit() and not _alive(int(pid))
        try:
            old = time.time() - p.stat().mtime > STALE_TMP_S
        except FileNotFoundError:
            continue
        if dead_here or old:
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _commit(path: epath.Path, split: str, result: dict) -> None:
    """Moves a worker's shard into place, then writes its entry (the commit)."""
    name = store.shard_name(result["entry"]["shard"])
    dst = path / split / f"{name}.npy"
    dst.parent.mkdir(parents=True, exist_ok=True)
    if "://" in str(path):
        with open(result["tmp"], "rb") as f:
            dst.write_bytes(f.read())
        os.remove(result["tmp"])
    else:
        os.replace(result["tmp"], dst)
    fileio.write_json(str(path / split / f"{name}.json"), result["entry"])


def _result(fut: cf.Future) -> dict:
    try:
        return fut.result()
    except cf.process.BrokenProcessPool as e:
        raise RuntimeError(
            "a tokenizing worker of the prepare step died: killed, out of memory (lower "
            "data.workers), or started by a script without an `if __name__ == '__main__':` "
            "guard (workers start with Python's spawn method, which reruns the script)"
        ) from e


def _sequential_blocks(src, first: int):
    """Blocks first, first+1, ... of a sequential source, as document lists."""
    it = src.documents()
    for _ in range(first * sources.RECORDS_PER_BLOCK):
        if next(it, None) is None:
            return
    while docs := [kv for _, kv in zip(range(sources.RECORDS_PER_BLOCK), it)]:
        yield docs


def fill(
    path: str, src, cfg: Data, domain: str, want: dict[str, int], workers: int
) -> dict[str, list[dict]]:
    """Commits shards of `path` until each split holds want[split] sequences; returns the
    committed entries per split."""
    root = epath.Path(path)
    entries = {sp: store.committed(path, sp) for sp in SPLITS}
    have = {sp: sum(e["sequences"] for e in entries[sp]) for sp in SPLITS}
    todo = {sp for sp in SPLITS if have[sp] < want[sp]}
    if not todo:
        return entries
    store.verify(path, entries)  # the shards this prepare builds on
    nxt = {sp: len(entries[sp]) for sp in SPLITS}
    remote = "://" in path
    tmp_root = tempfile.gettempdir() if remote else path
    tmp = os.path.join(tmp_root, f".tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex}")
    os.makedirs(tmp)
    job = _Job(src, cfg.tokenizer, cfg, tmp)
    label = f"preparing data.{domain} ({cfg.domain(domain).name})"
    progress = _Progress(label, sum(want.values()))
    j = min(nxt[sp] for sp in todo)
    seq = _sequential_blocks(src, j) if src.num_blocks is None else None
    n = workers or os.cpu_count() or 1
    pool, block_s = None, 0.0
    results: dict[int, dict] = {}
    inflight: dict[cf.Future, int] = {}
    try:
        while todo:
            while len(inflight) < (2 * n if pool else 1):
                splits = tuple(sp for sp in SPLITS if sp in todo and j >= nxt[sp])
                if not splits and seq is None:  # skip blocks every wanted split has
                    j = max(j, min(nxt[sp] for sp in todo))
                    continue
                docs = next(seq, None) if seq is not None else None
                if (seq is not None and docs is None) or (seq is None and j >= src.num_blocks):
                    break
                if not splits:
                    j += 1
                    continue
                block = block_order(src, cfg.seed, domain, j)
                if pool is None:  # blocks run here until a pool would pay for its start
                    fut, t0 = cf.Future(), time.perf_counter()
                    fut.set_result(job.run(j, block, splits, docs))
                    block_s = time.perf_counter() - t0
                else:
                    fut = pool.submit(_run_in_worker, j, block, splits, docs)
                inflight[fut] = j
                j += 1
            if not inflight:
                break
            done, _ = cf.wait(inflight, return_when=cf.FIRST_COMPLETED)
            for fut in done:
                results[inflight.pop(fut)] = _result(fut)
            for sp in sorted(todo):
                while sp in todo and sp in results.get(nxt[sp], {}):
                    r = results[nxt[sp]].pop(sp)
                    _commit(root, sp, r)
                    have[sp] += r["entry"]["sequences"]
                    nxt[sp] += 1
                    if have[sp] >= want[sp]:
                        todo.discard(sp)
            for k in [k for k, r in results.items() if not r]:
                del results[k]
            progress.draw(sum(min(have[sp], want[sp]) for sp in SPLITS))
            left = sum(want[sp] - have[sp] for sp in todo)
            per_block = max(1, sum(have.values()) // max(1, sum(nxt.values())))
            if pool is None and n > 1 and block_s * left / per_block > POOL_START_S:
                ctx = multiprocessing.get_context("spawn")
                pool = cf.ProcessPoolExecutor(
                    n, ctx, initializer=_init_worker, initargs=(job, os.getpid())
                )
    finally:
        for fut in inflight:
            fut.cancel()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(tmp, ignore_errors=True)
    progress.draw(sum(min(have[sp], want[sp]) for sp in SPLITS), end="\n")
    entries = {sp: store.committed(path, sp) for sp in SPLITS}
    for sp in SPLITS:
        store.write_index(path, sp, entries[sp])
    if todo:
        spec = cfg.domain(domain).source
        if sum(e["documents"] for sp in SPLITS for e in entries[sp]) == 0:
            raise ValueError(f"data.{domain}.source={spec!r}: the source is empty (no documents)")
        raise ValueError(
            f"data.{domain}.source={spec!r}: holds {have['train']} train and {have['val']} "
            f"validation sequences of data.seq_len={cfg.seq_len}; the plans need "
            f"{want['train']} train and {want['val']} validation (data.val_tokens="
            f"{cfg.val_tokens}, data.val_fraction={cfg.val_fraction})"
        )
    return entries


def _manifest(src, tok, cfg: Data, domain: str, content: str) -> dict:
    finite = src.num_blocks is not None
    return {
        "version": store.VERSION,
        "domain": domain,
        "name": cfg.domain(domain).name,
        "source": src.spec,
        "source_fingerprint": src.fingerprint,
        "revision": src.revision,
        "tokenizer": tok.spec,
        "tokenizer_fingerprint": tok.fingerprint,
        "eos_id": tok.eos_id,
        "seq_len": cfg.seq_len,
        "packing": cfg.packing,
        "val_fraction": cfg.val_fraction,
        "seed": cfg.seed,
        "source_blocks": src.num_blocks,
        "sampling": (
            f"store block j = source block permute(j, {src.num_blocks}, "
            f"derive_key({cfg.seed}, 'blocks', {domain!r})); a document is validation iff "
            f"blake2b(key)/2^64 < {cfg.val_fraction}"
            if finite
            else "sequential source: blocks of "
            f"{sources.RECORDS_PER_BLOCK} documents in stream order; a document is "
            f"validation iff blake2b(key)/2^64 < {cfg.val_fraction}"
        ),
        "content": content,
    }


def store_path(cache: str, domain: str, cfg: Data, content: str) -> str:
    name = "".join(ch if ch.isalnum() else "_" for ch in cfg.domain(domain).name)
    return os.path.join(cache, f"{domain}-{name}-{content}")


def _remove_if_empty(path: epath.Path) -> None:
    """Removes a store that a failed prepare left without one committed shard (its
    manifest and temporary files only), so failed attempts leave no orphans behind."""
    if not any(store.committed(str(path), sp) for sp in SPLITS):
        path.rmtree(missing_ok=True)


def prepare(
    cfg: Data, root: str, needs: dict[str, int], *, build: bool = True, verify: bool = False
) -> Corpus:
    """Stores holding `needs` train sequences per domain and the validation sets, under
    cfg.cache_dir or <root>/data_cache. Every source is opened (files found, hub commit
    resolved, fingerprint taken) before any is tokenized. `build=False` opens prepared
    stores only; `verify` checks every shard's checksum."""
    if unknown := set(needs) - set(DOMAINS):
        raise ValueError(f"needs={needs!r}: unknown domains {sorted(unknown)}; allowed {DOMAINS}")
    tok = make_tokenizer(cfg.tokenizer)
    cache = cfg.cache_dir or os.path.join(root, "data_cache")
    n_val = cfg.val_tokens // cfg.seq_len
    srcs = {d: sources.open_source(cfg.domain(d), f"data.{d}") for d in DOMAINS}  # all first
    stores = {}
    for d, src in srcs.items():
        content = content_key(src, tok, cfg, d)
        path = store_path(cache, d, cfg, content)
        want = {"train": needs.get(d, 0), "val": n_val}
        if build:
            p = epath.Path(path)
            p.mkdir(parents=True, exist_ok=True)
            if not (p / "manifest.json").exists():
                fileio.write_json(str(p / "manifest.json"), _manifest(src, tok, cfg, d, content))
            if "://" not in path:
                _clean_stale(p)
            try:
                entries = fill(path, src, cfg, d, want, cfg.workers)
            except Exception:
                _remove_if_empty(p)
                raise
        else:
            entries = {sp: store.committed(path, sp) for sp in SPLITS}
        short = {sp: sum(e["sequences"] for e in entries[sp]) for sp in SPLITS}
        if any(short[sp] < want[sp] for sp in SPLITS):
            raise StoreError(
                f"data.{d}: store {path} holds {short['train']} train and {short['val']} "
                f"validation sequences; this run needs {want['train']} and {want['val']}. "
                "Prepare the data first: python main.py --config=<this config> "
                f"--workdir=<this workdir> --only=prepare"
            )
        if verify:
            store.verify(path, entries)
        stores[d] = DomainStore(path, n_val, entries)
    return Corpus(tok, stores, cfg.seq_len, cfg.packing)
