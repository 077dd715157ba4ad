"""Stage plans: exact token budgets and the stream order as a pure index map.

Rounding unit: whole sequences. A sequence is seq_len target tokens (concat packing:
a chunk of seq_len+1 tokens, inputs = chunk[:-1], targets = chunk[1:]; first-fit: one
packed row of seq_len slots). Pools and budgets are floored to whole sequences
(P = post_pool_tokens // seq_len, ...), and the λ part is round_half_up(λ·P) sequences,
so "exactly round(λ·N) tokens" holds in units of seq_len.

The stream of a stage is slots 0..num_steps*batch-1; batch k holds slots
[k*batch, (k+1)*batch). Each slot maps to (domain id, sequence index in that domain's
train store) by `StagePlan.lookup`, a pure function of (seed, stage, slot):

  pretrain   Q = pretrain.tokens // seq_len D_pre sequences, each once, in a seeded
             permutation. Early exposure: E = round(λ·P) D_post pool sequences, the
             first E of a seeded pool permutation (so exposed sets are nested in λ),
             each once, on evenly spaced slots: slot_k = w0 + floor((2k+1)·W / 2E)
             inside the window [w0, w0+W) of the stage. "add": Q + E slots;
             "replace": Q slots, E of them D_post.
  posttrain  num_steps = max_tokens // (batch·seq_len); D_post pool in epochs, a new
             seeded permutation per epoch. Replay: R = round(r·slots) slots, evenly
             spaced, drawn from the D_pre sequences stage 1 saw (all Q in "add",
             Q − E in "replace"), in epochs of their own permutation.
             Compute-matched: the pool permutation's other P − E sequences, a single
             pass; R = round(r·(P−E)/(1−r)); the last partial batch is padded (domain
             −1, segment ids 0), so the count is exact; λ = 1 gives 0 steps.
  finetune   K = finetune.tokens // seq_len sequences of the D_ft pool (F sequences),
             in epochs of seeded permutations, last partial batch padded.

Seeds: every permutation key is derive_key(seed, purpose...) with the stage name (or
"pool" for the pool split shared by stages 1 and 2) folded in; the seed is the
experiment's, except that stage 2's own order and replay use `posttrain.seed` when set
(the pool split never does, so exposed and remaining parts stay disjoint).
"""

import dataclasses
import json

import numpy as np

from retention_jax.config import DOMAINS, STAGES, Experiment, round_half_up
from retention_jax.data.permute import derive_key, epoch_permute, permute

PRE, POST, FT = (DOMAINS.index(d) for d in ("pre", "post", "ft"))
PAD = -1


@dataclasses.dataclass(frozen=True)
class Part:
    """Ranks 0..count-1 of one domain in a stage -> sequence index in its store."""

    domain: int
    count: int
    kind: str  # "epochs" (seeded permutation per epoch over n) | "pool" (pool perm from offset)
    n: int
    key: int
    offset: int = 0
    then: "Part | None" = None  # maps the result through another part's order (replay)

    @property
    def span(self) -> int:
        """Store sequences the mapped indices can reach."""
        return self.then.span if self.then is not None else self.n

    def map(self, rank: np.ndarray) -> np.ndarray:
        if self.kind == "epochs":
            out = epoch_permute(rank, self.n, self.key)
        else:
            out = permute(rank + self.offset, self.n, self.key)
        return self.then.map(out) if self.then is not None else out


@dataclasses.dataclass(frozen=True)
class StagePlan:
    stage: str
    num_steps: int
    batch: int
    seq_len: int
    tokens: dict  # domain name -> planned target tokens (upper bound for first-fit rows)
    sequences: dict  # domain name -> sequences
    needs: dict  # domain name -> train sequences the store must hold
    main: Part
    inserted: Part | None = None  # sequences placed into the main stream: exposure or replay
    inserted_slots: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    packing: str = "concat"

    @property
    def slots(self) -> int:
        """Real (non-padding) slots; the stream has num_steps*batch >= slots."""
        return self.main.count + (self.inserted.count if self.inserted else 0)

    def lookup(self, stream_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Slots -> (domain id, sequence index in the domain's train store); padding -> (-1, -1)."""
        t = np.asarray(stream_idx, dtype=np.int64)
        dom = np.full(t.shape, PAD, np.int32)
        seq = np.full(t.shape, -1, np.int64)
        real = (t >= 0) & (t < self.slots)
        c = np.searchsorted(self.inserted_slots, t, side="left")
        ns = len(self.inserted_slots)
        is_ins = (
            real & (c < ns) & (self.inserted_slots[np.minimum(c, max(ns - 1, 0))] == t)
            if ns
            else real & False
        )
        is_main = real & ~is_ins
        if is_main.any():
            dom[is_main] = self.main.domain
            seq[is_main] = self.main.map(t[is_main] - c[is_main])
        if is_ins.any():
            dom[is_ins] = self.inserted.domain
            seq[is_ins] = self.inserted.map(c[is_ins])
        return dom, seq

    def summary(self) -> dict:
        return json.loads(
            json.dumps(
                dict(
                    stage=self.stage,
                    num_steps=self.num_steps,
                    batch=self.batch,
                    seq_len=self.seq_len,
                    packing=self.packing,
                    tokens=self.tokens,
                    sequences=self.sequences,
                    padding_rows=self.num_steps * self.batch - self.slots,
                )
            )
        )


def _even_slots(count: int, start: int, width: int) -> np.ndarray:
    k = np.arange(count, dtype=np.int64)
    return start + ((2 * k + 1) * width) // (2 * count) if count else k


def _counts(exp: Experiment) -> tuple[int, int, int, int, int]:
    s = exp.data.seq_len
    q = exp.pretrain.tokens // s
    p = exp.data.post_pool_tokens // s
    f = exp.data.ft_pool_tokens // s
    return s, q, p, f, round_half_up(exp.pretrain.exposure.lam * p)


def _finish(stage, exp, batch, main, inserted=None, slots=None, steps=None) -> StagePlan:
    s = exp.data.seq_len
    inserted = inserted if inserted is not None and inserted.count else None
    parts = [main] + ([inserted] if inserted else [])
    seqs = {d: 0 for d in DOMAINS}
    needs = {d: 0 for d in DOMAINS}
    for p in parts:
        seqs[DOMAINS[p.domain]] += p.count
        if p.count:
            needs[DOMAINS[p.domain]] = max(needs[DOMAINS[p.domain]], p.span)
    total = sum(p.count for p in parts)
    if steps is None:
        steps = -(-total // batch)
    return StagePlan(
        stage=stage,
        num_steps=int(steps),
        batch=batch,
        seq_len=s,
        tokens={d: n * s for d, n in seqs.items()},
        sequences=seqs,
        needs=needs,
        main=main,
        inserted=inserted,
        inserted_slots=slots if inserted else np.zeros(0, np.int64),
        packing=exp.data.packing,
    )


def plan(stage: str, exp: Experiment) -> StagePlan:
    """The plan of `stage` for one experiment node (exp.pretrain.exposure.lam is its λ)."""
    if stage not in STAGES:
        raise ValueError(f"stage={stage!r}: allowed {list(STAGES)}")
    seed = exp.seed
    s, q, p, f, e = _counts(exp)
    pool_key = derive_key(seed, "pool")
    mode = exp.pretrain.exposure.mode
    if stage == "pretrain":
        total = q + e if mode == "add" else q
        a, b = exp.pretrain.exposure.window
        w0, w1 = int(a * total), int(b * total)
        main = Part(PRE, total - e, "epochs", q, derive_key(seed, "pretrain", "pre"))
        exposed = Part(POST, e, "pool", p, pool_key, 0) if e else None
        return _finish(stage, exp, exp.pretrain.batch, main, exposed, _even_slots(e, w0, w1 - w0))
    if stage == "posttrain":
        batch, r = exp.posttrain.batch, exp.posttrain.replay
        if exp.posttrain.compute_matched:
            left = p - e
            n_replay = round_half_up(r * left / (1 - r)) if left else 0
            main = Part(POST, left, "pool", p, pool_key, e)
            steps = None
        else:
            steps = exp.posttrain.max_tokens // (batch * s)
            total = steps * batch
            n_replay = round_half_up(r * total)
            own = exp.stage_seed(stage)
            main = Part(POST, total - n_replay, "epochs", p, derive_key(own, stage, "post"))
        total = main.count + n_replay
        # Replay draws from the D_pre sequences stage 1 actually saw: the first `seen`
        # ranks of stage 1's D_pre order ("replace" gave E of its Q slots to D_post).
        seen = q - e if mode == "replace" else q
        stage1 = Part(PRE, seen, "epochs", q, derive_key(seed, "pretrain", "pre"))
        replay = (
            Part(
                PRE,
                n_replay,
                "epochs",
                seen,
                derive_key(exp.stage_seed(stage), stage, "replay"),
                then=stage1,
            )
            if n_replay
            else None
        )
        return _finish(stage, exp, batch, main, replay, _even_slots(n_replay, 0, total), steps)
    k = exp.finetune.tokens // s
    ft = Part(FT, k, "epochs", f, derive_key(seed, stage, "ft"))
    return _finish(stage, exp, exp.finetune.batch, ft)
