"""Packing token documents into training rows of seq_len (input, target) slots.

concat     (the default; the paper does not say how it packs): documents, each ending
           in EOS, are concatenated into one stream and cut into chunks of seq_len+1
           tokens that overlap by one token, so every token after the first is a target
           exactly once. Rows are single-domain, segment ids are all 1 and positions run
           0..seq_len-1 (documents attend to their predecessors in the row).
first_fit  each document d (with EOS) gives pairs (d[:-1], d[1:]), cut into pieces of at
           most seq_len pairs; pieces go into the first open row with room (at most
           `open_rows` rows stay open; when none fits, the oldest is closed). Segment ids
           number the pieces of a row from 1, positions restart at 0 in each piece, and
           free slots are padding (segment id 0). Done once, at prepare time, in numpy.
"""

import numpy as np

KEYS = ("inputs", "targets", "segment_ids", "positions")  # the arrays of a packed row


class FirstFitPacker:
    """First-fit packing of document pieces into rows with segment ids and positions."""

    def __init__(self, seq_len: int, open_rows: int = 64):
        self.seq_len, self.open_rows = seq_len, open_rows
        self._open = []  # [inputs, targets, segs, pos, used, nseg]
        self._closed = []
        self.tokens = 0

    def _new_row(self):
        s = self.seq_len
        z = np.zeros(s, np.int32)
        return [z.copy(), z.copy(), z.copy(), z.copy(), 0, 0]

    def _close_oldest(self):
        self._closed.append(self._open.pop(0))

    def add(self, doc: np.ndarray) -> None:
        s = self.seq_len
        for start in range(0, max(len(doc) - 1, 0), s):
            piece = doc[start : start + s + 1]
            n = len(piece) - 1
            at = next((i for i, r in enumerate(self._open) if s - r[4] >= n), None)
            if at is None:
                if len(self._open) >= self.open_rows:
                    self._close_oldest()
                self._open.append(self._new_row())
                at = len(self._open) - 1
            row = self._open[at]
            u = row[4]
            row[5] += 1
            row[0][u : u + n] = piece[:-1]
            row[1][u : u + n] = piece[1:]
            row[2][u : u + n] = row[5]
            row[3][u : u + n] = np.arange(n)
            row[4] += n
            self.tokens += n
            if row[4] == s:
                self._closed.append(self._open.pop(at))

    def sequences(self) -> int:
        return len(self._closed)

    def take(self, n: int) -> dict:
        rows = self._closed[:n]
        if not rows:
            return {k: np.zeros((0, self.seq_len), np.int32) for k in KEYS}
        return {k: np.stack([r[i] for r in rows]) for i, k in enumerate(KEYS)}

    def flush(self) -> None:
        """Close all open rows (end of a finite source)."""
        while self._open:
            self._close_oldest()


def pack(packing: str, docs: list[np.ndarray], seq_len: int) -> tuple[np.ndarray, int, int]:
    """A shard's array of `docs` (each ending in EOS) packed by `packing`, with its number
    of rows and of target tokens (the store records both)."""
    if packing == "concat":
        return _concat(docs, seq_len)
    return _first_fit(docs, seq_len)


def _concat(docs: list[np.ndarray], s: int) -> tuple[np.ndarray, int, int]:
    """The stream kept to whole rows, rows*s+1 tokens (rows overlap by one token); nothing
    when it holds less than one row."""
    flat = np.concatenate(docs) if docs else np.zeros(0, np.int32)
    rows = max(0, (len(flat) - 1) // s)
    return (flat[: rows * s + 1] if rows else flat[:0]), rows, rows * s


def _first_fit(docs: list[np.ndarray], s: int) -> tuple[np.ndarray, int, int]:
    """Rows of shape (len(KEYS), s); the targets are the non-padding slots."""
    packer = FirstFitPacker(s)
    for d in docs:
        packer.add(d)
    packer.flush()
    got = packer.take(packer.sequences())
    array = np.stack([got[k] for k in KEYS], axis=1)
    return array, len(array), int((got["segment_ids"] > 0).sum())
