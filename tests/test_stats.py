"""Effects over replicates: interval coverage, exact permutation p-values, paired readings."""

import itertools
import json
import math

import numpy as np
import pytest
from scipy import stats as sp

from retention_jax.analysis import frontier, report, stats, synthetic


def _experiments(effect: float, n: int, count: int, seed: int) -> np.ndarray:
    """`count` simulated experiments of n replicates: effect + N(0, 1) noise."""
    return effect + np.random.default_rng(seed).standard_normal((count, n))


@pytest.mark.parametrize("n", [3, 5, 8])
def test_interval_covers_the_true_effect_at_the_nominal_rate(n):
    runs = _experiments(0.4, n, 2000, seed=n)
    covered = [lo <= 0.4 <= hi for lo, hi in map(stats.t_interval, runs)]
    assert 0.93 <= np.mean(covered) <= 0.97


def test_no_effect_is_resolved_at_about_the_nominal_rate():
    found = [stats.effect(list(v)).resolved for v in _experiments(0.0, 5, 1000, seed=11)]
    assert 0.03 <= np.mean(found) <= 0.07
    line = stats.verdict("gap", stats.effect([0.1, -0.2, 0.15]), "mixed", "unmixed")
    assert line.startswith("gap: not resolved with 3 replicate(s), the interval spans 0: ")


def test_interval_matches_scipy():
    v = np.array([0.3, 0.1, 0.25, 0.4])
    want = sp.t.interval(0.95, len(v) - 1, loc=v.mean(), scale=sp.sem(v))
    np.testing.assert_allclose(stats.t_interval(v), want, rtol=1e-12)
    assert all(math.isnan(x) for x in stats.t_interval([1.0]))


@pytest.mark.parametrize("n", [3, 4, 5])
def test_sign_flip_p_is_exact(n):
    v = np.random.default_rng(n).normal(0.3, 1.0, n)
    flips = [abs(np.dot(s, v)) / n for s in itertools.product((1, -1), repeat=n)]
    want = sum(f >= abs(v.mean()) - 1e-12 for f in flips) / 2**n
    assert stats.sign_flip_p(v) == want
    assert stats.sign_flip_p(np.ones(n)) == 2 / 2**n  # all one sign: the smallest p


def test_bootstrap_and_needed():
    e = stats.effect([0.2, 0.25, 0.15, 0.3, 0.22, 0.18])
    lo, hi = e.bootstrap95
    assert lo < e.mean < hi and e.ci95[0] < lo  # percentile interval inside the t one here
    assert stats.effect([0.2, 0.3, 0.25]).bootstrap95 is None  # too few to resample
    v = [0.1, -0.05, 0.2]
    n = stats.needed(v)
    sd, mean = np.std(v, ddof=1), np.mean(v)
    assert sp.t.ppf(0.975, n - 1) * sd / math.sqrt(n) < mean
    assert sp.t.ppf(0.975, n - 2) * sd / math.sqrt(n - 1) >= mean
    nan_left_out = stats.effect([0.1, math.nan, 0.3], [4, 5, 6])
    assert nan_left_out.values == (0.1, 0.3) and nan_left_out.replicates == (4, 6)


def test_hypervolume_reference_is_shared_by_every_replicate():
    rows = synthetic.rows(pipelines=("music->chem",), seeds=(0, 1, 2), pools=(100_000,))
    rows = [r for r in rows if not r["compute_matched"] and not r["dropout"] and not r["replay"]]
    c = report.compare(rows)["music->chem, |D_post| 100K"]["(L_ft, L_ret)"]
    xy = report.points(rows, ("L_ft", "L_ret"))
    assert c["reference"] == list(xy.max(axis=0))
    hv = c["stats"]["hv_gain"]
    for s, value in zip(hv.replicates, hv.values, strict=True):
        mine = [r for r in rows if r["seed"] == s]
        a = report.points([r for r in mine if r["lam"] > 0], ("L_ft", "L_ret"))
        b = report.points([r for r in mine if r["lam"] == 0], ("L_ft", "L_ret"))
        ref = tuple(c["reference"])
        assert value == frontier.hypervolume(a, ref) - frontier.hypervolume(b, ref)
    assert hv.replicates == (0, 1, 2)


def test_effects_are_paired_within_replicates():
    """Replicate offsets that move mixed and unmixed together cancel in every effect."""
    rows = synthetic.rows(pipelines=("music->chem",), seeds=(0, 1, 2), pools=(100_000,))
    shifted = []
    for r in rows:
        r = dict(r, replicate=r["seed"])
        for key in ("L_ret", "L_im"):
            r[key] += 0.5 * r["seed"]  # a replicate-wide shift, shared across λ
        shifted.append(r)
    base, moved = report.summary(rows)["effects"], report.summary(shifted)["effects"]
    g = "music->chem, |D_post| 100K"
    for name in ("L_ret gap at stage-3 LR 5e-05", "L_ret fall per unit λ"):
        np.testing.assert_allclose(moved[g][name]["effect"].values, base[g][name]["effect"].values)
    gap = moved[g][report.PRIMARY]["effect"]
    assert gap.n == 3 and gap.resolved and gap.mean > 0
    assert json.loads(json.dumps(report.to_json(report.summary(shifted))))  # strict JSON
