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
from retention_jax.lock import pid_alive

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
        parts, n_docs = self._tokenize(docs if docs is not None else self.src.read(block), splits)
        wide = self.tok().vocab_size > 65536 or self.seq_len > 65535
        dtype = np.int32 if wide else np.uint16
        out = {}
        for sp in splits:
            array, rows, targets = packing_lib.pack(self.packing, parts[sp], self.seq_len)
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

    def _tokenize(self, docs, splits: tuple[str, ...]) -> tuple[dict, dict]:
        """Each split's documents as token arrays ending in EOS, and their number; encoded
        ENCODE_BATCH at a time, since one tokenizer call per document is slow."""
        tok = self.tok()
        eos = np.asarray([tok.eos_id], np.int32)
        parts = {sp: [] for sp in splits}
        n_docs = {sp: 0 for sp in splits}
        it = iter(docs)
        while batch := [kv for _, kv in zip(range(ENCODE_BATCH), it)]:
            val = store.is_val([k for k, _ in batch], self.val_fraction)
            for sp in splits:
                texts = [t for (_, t), v in zip(batch, val, strict=True) if v == (sp == "val")]
                for ids in tok.encode_batch(texts) if texts else ():
                    parts[sp].append(np.concatenate([ids, eos]))
                n_docs[sp] += len(texts)
        return parts, n_docs


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
        dead_here = h == host and pid.isdigit() and not pid_alive(int(pid))
        try:
            old = time.time() - p.stat().mtime > STALE_TMP_S
        except FileNotFoundError:
            continue
        if dead_here or old:
            shutil.rmtree(p, ignore_errors=True)


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
    filler = _Filler(path, src, cfg, domain, want)
    if not filler.todo:
        return filler.entries
    store.verify(path, filler.entries)  # the shards this prepare builds on
    filler.run(workers or os.cpu_count() or 1)
    return filler.finish()


def _tmp_dir(path: str) -> str:
    """A new directory for the shards being written, named for `_clean_stale`: beside a
    local store, so that a commit is a rename; in the local temp dir for a remote one."""
    root = tempfile.gettempdir() if "://" in path else path
    tmp = os.path.join(root, f".tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex}")
    os.makedirs(tmp)
    return tmp


class _Filler:
    """One fill of a store: store block j goes out next; shard nxt[sp] is the next that
    split sp commits. Finished shards wait in `results` for their turn, so the store is
    the same whatever order the blocks finish in."""

    def __init__(self, path: str, src, cfg: Data, domain: str, want: dict[str, int]):
        self.path, self.src, self.cfg, self.domain, self.want = path, src, cfg, domain, want
        self.entries = {sp: store.committed(path, sp) for sp in SPLITS}
        self.have = {sp: sum(e["sequences"] for e in self.entries[sp]) for sp in SPLITS}
        self.todo = {sp for sp in SPLITS if self.have[sp] < want[sp]}
        self.nxt = {sp: len(self.entries[sp]) for sp in SPLITS}
        self.pool, self.block_s = None, 0.0
        self.results: dict[int, dict] = {}
        self.inflight: dict[cf.Future, int] = {}

    def run(self, n: int) -> None:
        """Tokenizes and commits blocks (in up to n processes) until every split is full or
        the source ends; the workers and the temporary directory end with it."""
        tmp = _tmp_dir(self.path)
        self.job, self.n = _Job(self.src, self.cfg.tokenizer, self.cfg, tmp), n
        label = f"preparing data.{self.domain} ({self.cfg.domain(self.domain).name})"
        self.progress = _Progress(label, sum(self.want.values()))
        self.j = min(self.nxt[sp] for sp in self.todo)
        self.seq = _sequential_blocks(self.src, self.j) if self.src.num_blocks is None else None
        try:
            while self.todo:
                self._hand_out()
                if not self.inflight:
                    break
                done, _ = cf.wait(self.inflight, return_when=cf.FIRST_COMPLETED)
                for fut in done:
                    self.results[self.inflight.pop(fut)] = _result(fut)
                self._commit_in_order()
                self.progress.draw(self._held())
                self._maybe_start_pool()
        finally:
            self._stop()
            shutil.rmtree(tmp, ignore_errors=True)
        self.progress.draw(self._held(), end="\n")

    def _hand_out(self) -> None:
        """Starts blocks until 2 per worker are in flight (one without a pool), skipping
        the blocks that every split still wanted already holds; stops at the source's end."""
        while len(self.inflight) < (2 * self.n if self.pool else 1):
            splits = tuple(sp for sp in SPLITS if sp in self.todo and self.j >= self.nxt[sp])
            if not splits and self.seq is None:  # skip blocks every wanted split has
                self.j = max(self.j, min(self.nxt[sp] for sp in self.todo))
                continue
            docs = next(self.seq, None) if self.seq is not None else None
            if docs is None and (self.seq is not None or self.j >= self.src.num_blocks):
                return
            if splits:
                self._start(splits, docs)
            self.j += 1

    def _start(self, splits: tuple[str, ...], docs) -> None:
        """Block j runs here, timed, until a pool would pay for its start; then in the pool."""
        block = block_order(self.src, self.cfg.seed, self.domain, self.j)
        if self.pool is None:
            fut, t0 = cf.Future(), time.perf_counter()
            fut.set_result(self.job.run(self.j, block, splits, docs))
            self.block_s = time.perf_counter() - t0
        else:
            fut = self.pool.submit(_run_in_worker, self.j, block, splits, docs)
        self.inflight[fut] = self.j

    def _commit_in_order(self) -> None:
        """Commits each split's finished shards in shard order, up to its first unfinished
        one or until the split is full (the shortest run of blocks that fills it)."""
        for sp in sorted(self.todo):
            while sp in self.todo and sp in self.results.get(self.nxt[sp], {}):
                r = self.results[self.nxt[sp]].pop(sp)
                _commit(epath.Path(self.path), sp, r)
                self.have[sp] += r["entry"]["sequences"]
                self.nxt[sp] += 1
                if self.have[sp] >= self.want[sp]:
                    self.todo.discard(sp)
        for k in [k for k, r in self.results.items() if not r]:
            del self.results[k]

    def _maybe_start_pool(self) -> None:
        """Starts the workers once the work left, at the last block's pace, would take
        longer here than POOL_START_S: spawning them costs seconds."""
        left = sum(self.want[sp] - self.have[sp] for sp in self.todo)
        per_block = max(1, sum(self.have.values()) // max(1, sum(self.nxt.values())))
        if self.pool is None and self.n > 1 and self.block_s * left / per_block > POOL_START_S:
            ctx = multiprocessing.get_context("spawn")
            self.pool = cf.ProcessPoolExecutor(
                self.n, ctx, initializer=_init_worker, initargs=(self.job, os.getpid())
            )

    def _stop(self) -> None:
        """Cancels the blocks not started and waits for the running ones, so that no worker
        writes into the temporary directory once it is removed."""
        for fut in self.inflight:
            fut.cancel()
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def _held(self) -> int:
        """Sequences held towards the wants (the progress)."""
        return sum(min(self.have[sp], self.want[sp]) for sp in SPLITS)

    def finish(self) -> dict[str, list[dict]]:
        """Indexes what was committed; a split still short is an error naming the source."""
        entries = {sp: store.committed(self.path, sp) for sp in SPLITS}
        for sp in SPLITS:
            store.write_index(self.path, sp, entries[sp])
        if not self.todo:
            return entries
        key, cfg, have, want = f"data.{self.domain}", self.cfg, self.have, self.want
        spec = cfg.domain(self.domain).source
        if sum(e["documents"] for sp in SPLITS for e in entries[sp]) == 0:
            raise ValueError(f"{key}.source={spec!r}: the source is empty (no documents)")
        raise ValueError(
            f"{key}.source={spec!r}: holds {have['train']} train and {have['val']} "
            f"validation sequences of data.seq_len={cfg.seq_len}; the plans need "
            f"{want['train']} train and {want['val']} validation (data.val_tokens="
            f"{cfg.val_tokens}, data.val_fraction={cfg.val_fraction})"
        )


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
