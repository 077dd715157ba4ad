"""A small, fully known results table: for tests and for trying the notebooks without a run.

Losses follow a simple law: fine-tuning harder (larger ft_lr) lowers L_ft and raises L_ret
and L_pre; mixing (lam > 0), dropout and replay lower the retention losses. Post-training
stops early after 400 of 1,000 planned steps, except at `capped_post_lrs`, where it runs
to its cap (compute-matched runs take their single pass, 1,000·(1-λ) steps).
"""

import dataclasses
import itertools
import json
import math
import os

from retention_jax import fileio
from retention_jax.analysis.results import method_of


@dataclasses.dataclass(frozen=True)
class Grid:
    """What the synthetic table crosses; `variants` are (dropout, replay) pairs."""

    pipelines: tuple[str, ...] = ("music->chem", "music->qa")
    seeds: tuple[int, ...] = (0,)
    lams: tuple[float, ...] = (0.0, 0.5, 1.0)
    pools: tuple[int, ...] = (100_000, 200_000)
    post_lrs: tuple[float, ...] = (1e-3, 2e-3)
    ft_lrs: tuple[float, ...] = (5e-5, 2e-4, 1e-3)
    variants: tuple[tuple[float, float], ...] = ((0.0, 0.0), (0.05, 0.0), (0.0, 0.01))
    capped_post_lrs: tuple[float, ...] = ()


def rows(**grid) -> list[dict]:
    """Rows shaped like results.jsonl over `Grid(**grid)`, e.g. `rows(seeds=(0, 1))`."""
    g = Grid(**grid)
    out = []
    cells = itertools.product(
        g.pipelines, g.seeds, g.lams, g.pools, (False, True), g.post_lrs, g.ft_lrs
    )
    for pipe, seed, lam, pool, cm, post_lr, ft_lr in cells:
        for dropout, replay in g.variants:
            if (dropout or replay or cm) and pool != g.pools[-1] or (dropout or replay) and cm:
                continue  # the λ sweep alone varies the pool and the allocation
            d_post, d_ft = pipe.split("->")
            push = math.log10(ft_lr / 1e-5) / 2  # how hard stage 3 pushes: 0.35 .. 1
            noise = 0.01 * math.sin(17 * seed + 3 * lam + 1e3 * post_lr + 7 * push)
            shield = 0.3 * lam + 2 * dropout + 5 * replay  # less forgetting
            l_im = 1.5 - 0.1 * math.log10(pool / 1e5) + 0.1 * cm * lam**2 + 30 * (post_lr - 1e-3)
            post_id = f"post-{pipe}-{seed}-{lam}-{pool}-{cm}-{post_lr}-{dropout}-{replay}"
            capped = not cm and post_lr in g.capped_post_lrs
            row = dict(
                run_id=f"ft-{len(out):04d}",
                ids={"posttrain": post_id},
                pipeline=pipe,
                d_pre="prose",
                d_post=d_post,
                d_ft=d_ft,
                lam=lam,
                exposure_mode="add",
                compute_matched=cm,
                pool_tokens=pool,
                seed=seed,
                post_lr=post_lr,
                post_batch=16,
                dropout=dropout,
                replay=replay,
                ft_lr=ft_lr,
                post_planned_steps=round(1000 * (1 - lam)) if cm else 1000,
                post_steps=round(1000 * (1 - lam)) if cm else (1000 if capped else 400),
                post_stopped_early=not cm and not capped,
                L_im=l_im + noise,
                L_ret=l_im + (0.6 - shield) * push + noise,
                L_ft=2.5 - push + 0.5 * noise,
                L_pre=2.0 + (0.4 - 0.5 * shield) * push * post_lr / 1e-3 - noise,
            )
            row["method"] = method_of(row)
            out.append(row)
    return out


def write(workdir: str, rows: list[dict]) -> str:
    """Writes <workdir>/results.jsonl; returns its path."""
    path = os.path.join(workdir, "results.jsonl")
    fileio.write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return path
