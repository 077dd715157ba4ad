"""Frontiers, comparisons, reports and figures on hand-made and synthetic results."""

import json
import math

import numpy as np
import pytest
from matplotlib.collections import PathCollection

from retention_jax.analysis import figures, frontier, paper, report, results, synthetic


def test_pareto_front_hand_made():
    pts = np.array([[1, 5], [2, 3], [3, 4], [4, 1], [2, 3], [5, 1], [1, 6], [3, 3]])
    # (3,4) beaten by (2,3); (5,1) by (4,1); (1,6) by (1,5); (3,3) by (2,3); (2,3) twice.
    np.testing.assert_array_equal(frontier.pareto_front(pts), [[1, 5], [2, 3], [4, 1]])
    np.testing.assert_array_equal(
        frontier.pareto_mask(pts), [True, True, False, True, True, False, False, False]
    )


def test_pareto_front_single_point_and_all_ties():
    np.testing.assert_array_equal(frontier.pareto_front([[2.0, 3.0]]), [[2.0, 3.0]])
    np.testing.assert_array_equal(frontier.pareto_front([[1, 1], [1, 1], [1, 1]]), [[1, 1]])
    # Same x: only the lower y survives; same y: only the lower x.
    np.testing.assert_array_equal(frontier.pareto_front([[1, 2], [1, 3], [0, 3]]), [[0, 3], [1, 2]])


def test_dominance_and_area_by_hand():
    a = np.array([[1.0, 3.0], [2.0, 2.0], [3.0, 1.0]])
    b = np.array([[1.0, 4.0], [2.5, 2.0], [4.0, 1.5], [5.0, 5.0]])
    # b's frontier: (1,4), (2.5,2), (4,1.5); a beats (1,4) and (2.5,2) (by (2,2)) and (4,1.5).
    assert frontier.dominated_share(a, b) == 1.0
    assert frontier.dominated_share(b, a) == 0.0
    # Common x range [1, 3]: s_b - s_a = 4-3 on [1,2), 4-2 on [2,2.5), 2-2 on [2.5,3).
    assert frontier.area_between(a, b) == pytest.approx(1.0 + 1.0 + 0.0)
    assert frontier.area_between(b, a) == pytest.approx(-2.0)
    assert frontier.common_range(a, b) == (1.0, 3.0)
    # A dominated method: b shifted up by 1 loses everywhere, area = 1 * width.
    assert frontier.area_between(a, a + [0.0, 1.0]) == pytest.approx(2.0)
    assert frontier.dominated_share(a, a) == 0.0  # ties do not dominate


def test_partial_dominance_share():
    a = np.array([[1.0, 2.0], [3.0, 0.5]])
    b = np.array([[0.5, 3.0], [1.5, 2.5], [4.0, 0.2]])
    assert frontier.dominated_share(a, b) == pytest.approx(1 / 3)  # (1.5,2.5) by (1,2)
    assert frontier.dominated_share(b, a) == 0.0
    assert math.isnan(frontier.area_between([[0, 1]], [[2, 0]]))  # no common x range


def test_hypervolume_by_hand():
    pts = np.array([[1.0, 3.0], [2.0, 2.0], [3.0, 1.0], [3.5, 3.5]])
    # Against (4, 4): strips [1,2)x(4-3) + [2,3)x(4-2) + [3,4)x(4-1) = 1 + 2 + 3.
    assert frontier.hypervolume(pts, (4.0, 4.0)) == pytest.approx(6.0)
    assert frontier.hypervolume(pts, (0.5, 4.0)) == 0.0
    c = frontier.compare(pts, pts + 1.0, ref=(5.0, 5.0))
    assert c["hv_gain"] == pytest.approx((2 + 3 + 8) - (1 + 2 + 3))


def test_mean_ci_and_band():
    mean, half = frontier.mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert half == pytest.approx(4.302653 * 1.0 / math.sqrt(3), rel=1e-5)  # t_{0.975, 2}
    assert math.isnan(frontier.mean_ci([1.0])[1])
    xs = np.array([0.5, 1.0, 2.5])
    mean, half = frontier.band([np.array([[1, 3], [2, 1]]), np.array([[1, 5], [2, 3]])], xs)
    assert math.isnan(mean[0])
    np.testing.assert_allclose(mean[1:], [4.0, 2.0])
    np.testing.assert_allclose(half[1:], [12.706205 * 1.0, 12.706205 * 1.0], rtol=1e-5)


def test_method_of():
    assert results.method_of({"lam": 0.0}) == "unmixed"
    assert results.method_of({"lam": 1.0, "dropout": 0.02}) == "mixed+dropout"
    assert results.method_of({"lam": 0.5, "replay": 0.01, "dropout": 0.05}) == (
        "mixed+dropout+replay"
    )
    assert results.method_of({"lam": 0.5, "compute_matched": True}) == "mixed (compute-matched)"


def test_load_workdir_and_file(tmp_path):
    rows = synthetic.rows(pipelines=("music->chem",), lams=(0.0, 1.0), pools=(1000,))
    path = synthetic.write(str(tmp_path), rows)
    with open(path, "a") as f:
        f.write("\n\n")  # blank lines are skipped
    assert results.load(str(tmp_path)) == rows
    assert results.load(path) == json.loads(json.dumps(rows))


def test_report_table_and_compare():
    rows = synthetic.rows()
    text = report.table(rows)
    assert len(text.splitlines()) == len(rows) + 1
    assert text.splitlines()[0].split()[:3] == ["pipeline", "method", "lam"]
    # Two mixed points and one unmixed point per pipeline, by hand.
    hand = []
    for lam, l_ft, l_ret, l_pre in ((1, 1.0, 1.0, 2.0), (1, 2.0, 0.5, 3.0), (0, 1.0, 2.0, 1.0)):
        hand.append(dict(pipeline="a->b", lam=lam, L_ft=l_ft, L_ret=l_ret, L_pre=l_pre))
    c = report.compare(hand)["a->b"]
    assert c["(L_ft, L_ret)"]["b_dominated_by_a"] == 1.0
    assert c["(L_ft, L_ret)"]["area"] == 0.0  # common range is the single x = 1
    assert c["(L_ret, L_pre)"]["a_dominated_by_b"] == 0.0
    assert "mixed vs unmixed" in report.format_compare(report.compare(rows))


def test_compare_with_seeds_gives_mean_and_ci():
    c = report.compare(synthetic.rows(seeds=(0, 1, 2)))
    view = c["music->chem, |D_post| 200K"]["(L_ft, L_ret)"]
    assert view["seeds"] == 3
    assert view["area"] > 0 and view["area_ci95"] > 0
    assert view["b_dominated_by_a"] > 0.9


def test_lambda_curves_pick_lowest_l_im_at_reference_lr():
    rows = synthetic.rows(pipelines=("music->chem",))
    curves = report.lambda_curves(rows)
    assert set(curves) == {(False, 100_000), (False, 200_000), (True, 200_000)}
    assert [p[0] for p in curves[False, 200_000]] == [0.0, 0.5, 1.0]
    for lam, l_im, l_ret in curves[True, 200_000]:
        cands = [
            r
            for r in rows
            if r["compute_matched"]
            and r["lam"] == lam
            and r["ft_lr"] == 5e-5
            and not r["dropout"]
            and not r["replay"]
        ]
        best = min(cands, key=lambda r: r["L_im"])
        assert (l_im, l_ret) == (pytest.approx(best["L_im"]), pytest.approx(best["L_ret"]))
    paper_curves = report.lambda_curves(paper.rows())
    assert paper_curves[False, 300_000_000] == [
        (0.0, 1.405, 1.807),
        (0.5, 1.402, 1.719),
        (1.0, 1.402, 1.682),
    ]
    assert min(paper_curves[True, 300_000_000], key=lambda p: p[2])[0] == 0.5


def _scatter_sizes(ax) -> list[int]:
    return [len(c.get_offsets()) for c in ax.collections if isinstance(c, PathCollection)]


def test_frontier_figure_counts():
    rows = synthetic.rows()
    fig = figures.draw_frontiers(rows)
    axes = fig.get_axes()
    assert len(axes) == 2 * 2 * 2  # (two pipelines x two pools) x two views
    first = [r for r in rows if results.group(r) == "music->chem, |D_post| 100K"]
    per_method = {m: sum(1 for r in first if r["method"] == m) for m in ("unmixed", "mixed")}
    for ax in axes:
        assert _scatter_sizes(ax) == [per_method["unmixed"], per_method["mixed"]]
        assert len(ax.get_lines()) == 2
        assert ax.get_xlabel().startswith(("L_ft: chem", "L_ft: qa", "L_ret: music"))
    ax = axes[0]
    assert ax.get_title().startswith("music->chem, |D_post| 100K")
    front = frontier.pareto_front(
        report.points([r for r in first if r["method"] == "mixed"], ("L_ft", "L_ret"))
    )
    np.testing.assert_allclose(ax.get_lines()[1].get_xdata(), front[:, 0])


def test_methods_and_lambda_figure_counts():
    rows = synthetic.rows(pipelines=("music->chem",), seeds=(0, 1))
    fig = figures.draw_methods(rows)
    small, ax = fig.get_axes()  # one panel per pool; the methods ran at the larger one
    assert len(small.get_lines()) == 2  # unmixed, mixed
    assert len(ax.get_lines()) == 6  # unmixed, mixed, mixed+{dropout,replay}, unmixed+{...}
    assert len(_scatter_sizes(ax)) == 6
    fig = figures.draw_lambda(rows, reference="paper")
    axes = fig.get_axes()
    assert len(axes) == 4  # added and compute-matched, L_im and L_ret
    added, matched = axes[:2], axes[2:]
    for ax in added:
        assert len(ax.get_lines()) == 2 + 3  # two pools, three paper pools
        assert _scatter_sizes(ax) == [1, 1]  # a star per pool
    for ax in matched:
        assert len(ax.get_lines()) == 1 + 1
    star = added[1].collections[1].get_offsets()[0]
    best = min(report.lambda_curves(rows)[False, 200_000], key=lambda p: p[2])
    np.testing.assert_allclose(star, best[::2])


def test_draw_all_writes_what_rows_support(tmp_path):
    wd = str(tmp_path)
    synthetic.write(wd, synthetic.rows(pipelines=("music->chem",)))
    names = sorted(p.rsplit("/", 1)[1] for p in figures.draw_all(wd))
    assert names == sorted(
        f"{n}.{e}" for n in ("frontiers", "methods", "lambda_music-chem") for e in ("png", "pdf")
    )
    plain = synthetic.rows(pipelines=("x->y",), lams=(0.0, 1.0), pools=(1,), variants=((0, 0),))
    plain = [r for r in plain if not r["compute_matched"]]
    paths = figures.draw_all(str(tmp_path / "b"), rows=[r for r in plain if r["lam"] == 1.0])
    assert [p.rsplit("/", 1)[1] for p in paths] == ["frontiers.png", "frontiers.pdf"]
    assert (tmp_path / "b" / "figures" / "frontiers.pdf").stat().st_size > 0
