"""Batches: a grain MapDataset over batch indices, one vectorised gather per batch.

Batch k of a stage is slots [k*batch, (k+1)*batch) of the plan's index map (plan.py),
read from the memory-mapped stores (store.py): a pure function of (seed, k), with no
per-token Python. Process p of n gets rows [p*batch/n, (p+1)*batch/n) of every batch,
so each host reads only its own slice and `to_global` assembles the global batch with
jax.make_array_from_process_local_data. The iterator is a grain DatasetIterator: its
get_state()/set_state() ({"next_index": k}) checkpoint with
grain.checkpoint.CheckpointSave/CheckpointRestore as an Orbax item.

Keys of a batch: inputs, targets, segment_ids, positions (int32 [rows, seq_len];
segment id 0 marks padding, whose targets carry no loss) and domain (int32 [rows],
indexes DOMAINS; -1 on padding rows).
"""

import grain
import numpy as np

from retention_jax.config import DOMAINS
from retention_jax.data.packing import KEYS


def _pad_rows(n: int, seq_len: int) -> dict:
    z = np.zeros((n, seq_len), np.int32)
    return {k: z.copy() for k in KEYS}


def gather(corpus, split: str, domain_ids: np.ndarray, seq_idx: np.ndarray) -> dict:
    """Rows for (domain id, sequence index) pairs; domain -1 gives padding rows."""
    n, s = len(domain_ids), corpus.seq_len
    out = _pad_rows(n, s)
    for d, name in enumerate(DOMAINS):
        sel = np.nonzero(domain_ids == d)[0]
        if len(sel):
            rows = corpus.stores[name].rows(split, seq_idx[sel])
            for k in KEYS:
                out[k][sel] = rows[k]
    out["domain"] = np.asarray(domain_ids, np.int32)
    return out


class _Batch:
    """Batch index -> this process's rows (picklable, thread safe)."""

    def __init__(self, corpus, plan, lo: int, hi: int):
        self.corpus, self.plan, self.lo, self.hi = corpus, plan, lo, hi

    def __call__(self, k: int) -> dict:
        slots = np.arange(
            k * self.plan.batch + self.lo, k * self.plan.batch + self.hi, dtype=np.int64
        )
        dom, seq = self.plan.lookup(slots)
        return gather(self.corpus, "train", dom, seq)


def dataset(corpus, plan, *, process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
    """The stage's batches for one process as a grain MapDataset (random access)."""
    if plan.batch % process_count:
        raise ValueError(
            f"{plan.stage}.batch={plan.batch}: not divisible by process_count={process_count}"
        )
    if plan.seq_len != corpus.seq_len or plan.packing != corpus.packing:
        raise ValueError(
            f"data.seq_len/packing of the plan ({plan.seq_len}, {plan.packing}) "
            "differ from the corpus "
            f"({corpus.seq_len}, {corpus.packing})"
        )
    for d, n in plan.needs.items():
        have = corpus.stores[d].num_sequences["train"]
        if n > have:
            raise ValueError(
                f"data.{d}: plan {plan.stage} needs {n} train sequences, the store has {have}"
            )
    rows = plan.batch // process_count
    fn = _Batch(corpus, plan, process_index * rows, (process_index + 1) * rows)
    return grain.MapDataset.range(plan.num_steps).map(fn)


def loader(corpus, plan, threads: int, *, process_index: int = 0, process_count: int = 1):
    """An iterator over this process's rows of every batch, with get_state()/set_state().

    `threads` read threads prefetch batches (data.read_threads; 0 reads in the calling
    thread). Threads suffice: a batch is a few numpy gathers from memory maps, which
    release the GIL, so grain's multiprocess prefetch would only add copies."""
    ds = dataset(corpus, plan, process_index=process_index, process_count=process_count)
    opts = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)
    return iter(ds.to_iter_dataset(opts))


def validation_batches(corpus, domain: str, batch: int) -> list[dict]:
    """The fixed validation set of `domain` in batches; the last is padded with segment-0 rows."""
    if domain not in DOMAINS:
        raise ValueError(f"domain={domain!r}: allowed {list(DOMAINS)}")
    n = corpus.stores[domain].num_sequences["val"]
    d = DOMAINS.index(domain)
    out = []
    for start in range(0, n, batch):
        idx = np.arange(start, start + batch, dtype=np.int64)
        real = idx < n
        dom = np.where(real, d, -1).astype(np.int32)
        out.append(gather(corpus, "val", dom, np.where(real, idx, 0)))
    return out


def tokens_by_domain(batch: dict) -> np.ndarray:
    """Target tokens (segment id > 0) per domain in a host batch, shape [len(DOMAINS)]."""
    per_row = (np.asarray(batch["segment_ids"]) > 0).sum(axis=1)
    dom = np.asarray(batch["domain"])
    ok = dom >= 0
    return np.bincount(dom[ok], weights=per_row[ok], minlength=len(DOMAINS)).astype(np.int64)


def to_global(batch: dict, mesh, spec) -> dict:
    """Host rows -> global jax.Arrays sharded by `spec` on `mesh` ("domain" stays on host)."""
    import jax
    from jax.sharding import NamedSharding

    sharding = NamedSharding(mesh, spec)
    return {
        k: jax.make_array_from_process_local_data(sharding, v)
        for k, v in batch.items()
        if k != "domain"
    }
