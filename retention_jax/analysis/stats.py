"""An effect measured once per replicate, read with its uncertainty.

Every comparison of this project is paired: replicate r of the graph runs every λ on the
same pools, seeds and data order, so the effect of exposure is one number per replicate
(mixed against unmixed within it) and the question is whether their mean differs from 0.

- Interval: Student-t on the per-replicate values (exact under normal noise, the
  calibration test checks its coverage); a percentile bootstrap over replicates beside it
  from BOOTSTRAP_MIN_N replicates on, where resampling has enough distinct draws to mean
  something.
- Test: the paired sign-flip permutation test (under "no effect" each replicate's value
  is as likely to have either sign), exact by enumerating all 2^n sign patterns. Its
  smallest two-sided p is 2/2^n: n = 5 cannot go below 0.0625, so p < 0.05 needs n >= 6.
- Verdict: resolved when the 95% t-interval excludes 0.
- `needed`: the fewest replicates at which an interval of the observed spread would
  exclude the observed mean (a planning number, not a power calculation).
"""

import dataclasses
import itertools
import math

import numpy as np
from scipy import stats as sp

LEVEL = 0.95
BOOTSTRAP_MIN_N = 6
BOOTSTRAP_DRAWS = 10_000
EXACT_MAX_N = 16  # beyond: a seeded Monte Carlo over sign patterns
MONTE_CARLO_DRAWS = 1 << 16
NEEDED_MAX = 10_000


@dataclasses.dataclass(frozen=True)
class Effect:
    """One effect over replicates: its values (in replicate order), mean, interval, p."""

    values: tuple[float, ...]
    replicates: tuple[int, ...]
    mean: float
    sd: float
    ci95: tuple[float, float]
    bootstrap95: tuple[float, float] | None
    p: float
    needed: int | None

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def resolved(self) -> bool:
        lo, hi = self.ci95
        return self.n > 1 and (lo > 0 or hi < 0)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(n=self.n, resolved=self.resolved)
        return d


def t_interval(values: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The Student-t interval of the mean; (NaN, NaN) for fewer than 2 values."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return (math.nan, math.nan)
    half = sp.t.ppf(0.5 + level / 2, len(v) - 1) * np.std(v, ddof=1) / math.sqrt(len(v))
    return (float(v.mean() - half), float(v.mean() + half))


def bootstrap_interval(
    values: np.ndarray, level: float = LEVEL, draws: int = BOOTSTRAP_DRAWS, seed: int = 0
) -> tuple[float, float]:
    """Percentile interval of the mean over replicates resampled with replacement."""
    v = np.asarray(values, dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(v), size=(draws, len(v)))
    means = v[idx].mean(axis=1)
    lo, hi = np.quantile(means, [0.5 - level / 2, 0.5 + level / 2])
    return (float(lo), float(hi))


def sign_flip_p(values: np.ndarray, seed: int = 0) -> float:
    """Two-sided paired permutation p-value of mean != 0: the share of sign patterns whose
    |mean| reaches the observed one. Exact up to EXACT_MAX_N values."""
    v = np.asarray(values, dtype=float)
    if len(v) == 0:
        return math.nan
    if len(v) <= EXACT_MAX_N:
        signs_SxN = np.array(list(itertools.product((1.0, -1.0), repeat=len(v))))
    else:
        rng = np.random.default_rng(seed)
        signs_SxN = rng.choice((1.0, -1.0), size=(MONTE_CARLO_DRAWS, len(v)))
    observed = abs(v.mean())
    flipped = np.abs(signs_SxN @ v) / len(v)
    return float(np.mean(flipped >= observed * (1 - 1e-12)))


def needed(values: np.ndarray, level: float = LEVEL) -> int | None:
    """The fewest replicates whose t-interval, at the observed mean and spread, excludes 0;
    None without a spread to go on (fewer than 2 values) or when 0 is the mean."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2 or v.mean() == 0:
        return None
    sd, mean = float(np.std(v, ddof=1)), abs(float(v.mean()))
    if sd == 0:
        return 2
    z = sp.norm.ppf(0.5 + level / 2)  # t > z at every n, so no n below (z·sd/mean)² does
    for n in range(max(2, int((z * sd / mean) ** 2)), NEEDED_MAX + 1):
        if sp.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n) < mean:
            return n
    return None


def effect(values: list[float], replicates: list[int] | None = None) -> Effect:
    """The statistics of one effect from its per-replicate values (NaNs are left out: a
    replicate where the effect is undefined, e.g. frontiers that share no x range)."""
    replicates = list(range(len(values))) if replicates is None else list(replicates)
    keep = [(r, float(v)) for r, v in zip(replicates, values, strict=True) if not math.isnan(v)]
    reps, vals = (tuple(x) for x in zip(*keep, strict=True)) if keep else ((), ())
    v = np.asarray(vals, dtype=float)
    return Effect(
        values=vals,
        replicates=reps,
        mean=float(v.mean()) if len(v) else math.nan,
        sd=float(np.std(v, ddof=1)) if len(v) > 1 else math.nan,
        ci95=t_interval(v),
        bootstrap95=bootstrap_interval(v) if len(v) >= BOOTSTRAP_MIN_N else None,
        p=sign_flip_p(v),
        needed=needed(v),
    )


def verdict(label: str, e: Effect, positive: str, negative: str) -> str:
    """One line: which way the effect goes with its interval and p, or that it is not
    resolved and how many replicates the observed spread suggests."""
    if e.n == 0:
        return f"{label}: undefined in every replicate"
    lo, hi = e.ci95
    numbers = f"{e.mean:+.4f} (95% CI {lo:+.4f} to {hi:+.4f}), p = {e.p:.3g}, n = {e.n}"
    if e.resolved:
        return f"{label}: {positive if e.mean > 0 else negative}: {numbers}"
    hint = f"; its spread suggests {e.needed} replicates" if e.needed else ""
    why = "one replicate gives no interval" if e.n == 1 else "the interval spans 0"
    return f"{label}: not resolved with {e.n} replicate(s), {why}: {numbers}{hint}"
