"""2-D Pareto frontiers (lower is better on both axes) and numbers that compare two of them.

A frontier is read as its attainment staircase s(x) = min{y_i : x_i <= x}: the best y a
method reaches without exceeding x. Areas and hypervolumes are exact integrals of it, and
the figures draw the same staircase, so what is quoted is what is seen.
"""

import warnings

import numpy as np
from scipy import stats


def pareto_mask(xy: np.ndarray) -> np.ndarray:
    """True for points that no other point beats (<= on both axes, < on one)."""
    xy = np.asarray(xy, dtype=float).reshape(-1, 2)
    le = np.all(xy[:, None, :] <= xy[None, :, :], axis=-1)  # le[j, i]: j <= i on both
    lt = np.any(xy[:, None, :] < xy[None, :, :], axis=-1)
    return ~np.any(le & lt, axis=0)


def pareto_front(xy: np.ndarray) -> np.ndarray:
    """The Pareto set without duplicates, sorted by x (so y falls strictly)."""
    xy = np.asarray(xy, dtype=float).reshape(-1, 2)
    return np.unique(xy[pareto_mask(xy)], axis=0)


def staircase(front: np.ndarray, x: np.ndarray) -> np.ndarray:
    """s(x) of a sorted front; NaN left of its first point, where it reaches nothing."""
    i = np.searchsorted(front[:, 0], np.asarray(x, dtype=float), side="right") - 1
    return np.where(i >= 0, front[np.maximum(i, 0), 1], np.nan)


def dominated_share(a: np.ndarray, b: np.ndarray) -> float:
    """Share of b's frontier points that some point of `a` beats."""
    fb = pareto_front(b)
    xa = np.asarray(a, dtype=float).reshape(-1, 2)
    le = np.all(xa[:, None, :] <= fb[None, :, :], axis=-1)
    lt = np.any(xa[:, None, :] < fb[None, :, :], axis=-1)
    return float(np.mean(np.any(le & lt, axis=0)))


def common_range(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """The x interval both frontiers span."""
    fa, fb = pareto_front(a), pareto_front(b)
    return max(fa[0, 0], fb[0, 0]), min(fa[-1, 0], fb[-1, 0])


def area_between(a: np.ndarray, b: np.ndarray) -> float:
    """Integral of s_b(x) - s_a(x) over the common x range: > 0 when a lies below b.

    NaN when the frontiers share no x range.
    """
    fa, fb = pareto_front(a), pareto_front(b)
    lo, hi = common_range(a, b)
    if hi < lo:
        return float("nan")
    xs = np.unique(np.clip(np.concatenate([fa[:, 0], fb[:, 0]]), lo, hi))
    gap = staircase(fb, xs[:-1]) - staircase(fa, xs[:-1])
    return float(np.sum(gap * np.diff(xs)))


def hypervolume(points: np.ndarray, ref: tuple[float, float]) -> float:
    """Area dominated by the points and bounded by `ref` (larger is better)."""
    front = pareto_front(points)
    front = front[(front[:, 0] < ref[0]) & (front[:, 1] < ref[1])]
    xs = np.append(front[:, 0], ref[0])
    return float(np.sum(np.diff(xs) * (ref[1] - front[:, 1])))


def compare(
    a: np.ndarray, b: np.ndarray, ref: tuple[float, float] | None = None
) -> dict[str, float]:
    """What a paper quotes about frontier a against frontier b.

    `hv_gain` = hypervolume(a) - hypervolume(b) against `ref` (default: the worst x and
    worst y of both point sets); unlike `area` it is defined when the x ranges do not meet.
    """
    if ref is None:
        ref = tuple(np.max(np.concatenate([np.reshape(a, (-1, 2)), np.reshape(b, (-1, 2))]), 0))
    lo, hi = common_range(a, b)
    return {
        "b_dominated_by_a": dominated_share(a, b),
        "a_dominated_by_b": dominated_share(b, a),
        "area": area_between(a, b),
        "x_lo": lo,
        "x_hi": hi,
        "hv_gain": hypervolume(a, ref) - hypervolume(b, ref),
    }


def mean_ci(values: np.ndarray, level: float = 0.95, axis: int = 0) -> tuple:
    """Mean and Student-t confidence half-width over seeds (NaN half-width for one seed)."""
    v = np.asarray(values, dtype=float)
    n = np.sum(~np.isnan(v), axis=axis)
    with warnings.catch_warnings():  # columns with no value at all stay NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(v, axis=axis)
        sem = np.nanstd(v, axis=axis, ddof=1) / np.sqrt(n)
        half = stats.t.ppf(0.5 + level / 2, np.maximum(n - 1, 1)) * np.where(n > 1, sem, np.nan)
    return mean, half


def band(
    per_seed: list[np.ndarray], xs: np.ndarray, level: float = 0.95
) -> tuple[np.ndarray, np.ndarray]:
    """Mean staircase over seeds' frontiers on `xs`, and its confidence half-width."""
    curves = np.stack([staircase(pareto_front(p), xs) for p in per_seed])
    return mean_ci(curves, level)
