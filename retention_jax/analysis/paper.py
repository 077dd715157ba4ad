"""The paper's Fig. 3 numbers as rows shaped like results.jsonl, so a reproduction can be
drawn beside them with the same code.

135M, C4 -> MusicPile -> ChemPile, stage 3 at LR 5e-5, read off the figures (+-0.005).
The paper draws both panels for all three pools at λ ∈ {0, 0.25, 0.5, 0.75, 1}: 30 cells
each of L_im and L_ret. Only the cells read so far are here, 14 of the 30: Fig. 3a at
λ ∈ {0, 0.5, 1} for every pool, and Fig. 3b for 300M. Still missing are Fig. 3a at λ = 0.25
and 0.75 (6 cells) and Fig. 3b for 30M and 150M (10 cells). Those two curves are known only
by their best λ (0.25), kept in COMPUTE_MATCHED_BEST_LAM. No value is filled in by guess.
"""

PIPELINE = "musicpile->chempile"  # as configs/corpora.py names the real corpora
FT_LR = 5e-5
POOLS = (30_000_000, 150_000_000, 300_000_000)

# Fig. 3a, stage 2 to convergence: |D_post| -> (lam, L_im, L_ret) per point.
ADDED = {
    30_000_000: ((0.0, 1.788, 2.175), (0.5, 1.778, 2.076), (1.0, 1.765, 2.080)),
    150_000_000: ((0.0, 1.506, 1.880), (0.5, 1.507, 1.819), (1.0, 1.505, 1.767)),
    300_000_000: ((0.0, 1.405, 1.807), (0.5, 1.402, 1.719), (1.0, 1.402, 1.682)),
}

# Fig. 3b, compute-matched (one pass over D_post in total).
COMPUTE_MATCHED = {
    300_000_000: (
        (0.0, 1.630, 1.950),
        (0.25, 1.651, 1.905),
        (0.5, 1.673, 1.888),
        (0.75, 1.713, 1.916),
        (1.0, 1.769, 1.912),
    ),
}


# Fig. 3b: the λ with the lowest L_ret per pool.
COMPUTE_MATCHED_BEST_LAM = {30_000_000: 0.25, 150_000_000: 0.25, 300_000_000: 0.5}


def rows() -> list[dict]:
    """Every Fig. 3 point as a results row (only the fields the λ figure reads)."""
    out = []
    for compute_matched, table in ((False, ADDED), (True, COMPUTE_MATCHED)):
        for pool, points in table.items():
            for lam, l_im, l_ret in points:
                out.append(
                    dict(
                        pipeline=PIPELINE,
                        d_pre="c4",
                        d_post="musicpile",
                        d_ft="chempile",
                        lam=lam,
                        compute_matched=compute_matched,
                        pool_tokens=pool,
                        ft_lr=FT_LR,
                        seed=0,
                        L_im=l_im,
                        L_ret=l_ret,
                    )
                )
    return out
