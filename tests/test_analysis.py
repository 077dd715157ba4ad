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
    assert len(text.splitlines()) == len(rows) + 2  # header, rows, convergence note
    assert text.splitlines()[0].split()[:3] == ["pipeline", "method", "lam"]
    # Per pipeline: 100K 3 λ × 2 LRs; 200K 3 λ × 2 LRs × 3 variants + 6 compute-matched.
    assert text.splitlines()[-1].startswith("0 of 60 post-training runs hit their token cap")
    # Two mixed points and one unmixed point per pipeline, by hand.
    hand = []
    for lam, l_ft, l_ret, l_pre in ((1, 1.0, 1.0, 2.0), (1, 2.0, 0.5, 3.0), (0, 1.0, 2.0, 1.0)):
        hand.append(dict(pipeline="a->b", lam=lam, L_ft=l_ft, L_ret=l_ret, L_pre=l_pre))
    c = report.compare(hand)["a->b"]
    assert c["(L_ft, L_ret)"]["b_dominated_by_a"] == 1.0
    assert c["(L_ft, L_ret)"]["area"] == 0.0  # common range is the single x = 1
    assert c["(L_ret, L_pre)"]["a_dominated_by_b"] == 0.0
    assert c["(L_ret, L_pre)"]["cap_hit_left_out"] == 0
    assert "mixed vs unmixed" in report.format_compare(report.compare(rows))


def test_cap_hit_rows_are_marked_and_left_out():
    rows = synthetic.rows(pipelines=("music->chem",), capped_post_lrs=(2e-3,))
    capped = [r for r in rows if report.cap_hit(r)]
    # Half the non compute-matched stage-2 runs ran at 2e-3; 3 leaves (ft_lr) per run.
    plain = [r for r in rows if not r["compute_matched"]]
    assert len(capped) == len(plain) // 2 and all(r["post_lr"] == 2e-3 for r in capped)
    assert report.stage2_end(capped[0]) == "cap"
    assert report.stage2_end(next(r for r in rows if r["compute_matched"])) == "matched"
    text = report.table(rows)
    assert sum(" cap " in line for line in text.splitlines()[1:-1]) == len(capped)
    n_runs = len({r["ids"]["posttrain"] for r in rows})
    assert text.splitlines()[-1].startswith(
        f"{len(capped) // 3} of {n_runs} post-training runs hit their token cap"
    )
    c = report.compare(rows)["music->chem, |D_post| 200K"]["(L_ft, L_ret)"]
    mixed_or_not = [r for r in capped if r["method"] in ("mixed", "unmixed")]
    mine = [r for r in capped if results.group(r) == "music->chem, |D_post| 200K"]
    # λ 0, 0.5, 1 at post_lr 2e-3, three stage-3 LRs each.
    assert c["cap_hit_left_out"] == len([r for r in mine if r in mixed_or_not]) == 9
    kept = [r for r in report.converged(rows) if results.group(r) == results.group(mine[0])]
    expect = frontier.compare(
        report.points([r for r in kept if r["method"] == "mixed"], ("L_ft", "L_ret")),
        report.points([r for r in kept if r["method"] == "unmixed"], ("L_ft", "L_ret")),
    )
    assert c["area"] == pytest.approx(expect["area"])
    every = report.compare(rows, include_cap_hit=True)["music->chem, |D_post| 200K"]
    assert every["(L_ft, L_ret)"]["cap_hit_left_out"] == 0
    assert "9 cap-hit leaves left out" in report.format_compare(report.compare(rows))


def test_old_rows_without_convergence_fields_still_load(tmp_path):
    rows = synthetic.rows(pipelines=("music->chem",), lams=(0.0, 1.0), pools=(1000,))
    for r in rows:
        for key in ("post_stopped_early", "post_planned_steps", "post_steps"):
            del r[key]
    synthetic.write(str(tmp_path), rows)
    loaded = results.load(str(tmp_path))
    assert not any(report.cap_hit(r) for r in loaded)
    assert {report.stage2_end(r) for r in loaded} == {"?", "matched"}
    runs = {r["ids"]["posttrain"] for r in loaded}
    unknown = {r["ids"]["posttrain"] for r in loaded if not r["compute_matched"]}
    assert (len(runs), len(unknown)) == (16, 12)  # 2 λ × 2 LRs × (3 variants + matched)
    note = report.table(loaded).splitlines()[-1]
    assert note.startswith("0 of 16 post-training runs")
    assert note.endswith("12 run(s) did not record how they ended ('?')")
    assert figures.draw_all(str(tmp_path))  # frontiers and methods figures draw


def test_compare_over_replicates_gives_mean_interval_and_p():
    c = report.compare(synthetic.rows(seeds=(0, 1, 2)))
    view = c["music->chem, |D_post| 200K"]["(L_ft, L_ret)"]
    area = view["stats"]["area"]
    assert view["replicates"] == area.n == 3 and area.replicates == (0, 1, 2)
    assert view["area"] == area.mean > 0 and area.ci95[0] > 0 and area.p == 0.25
    assert view["b_dominated_by_a"] > 0.9


def test_lambda_curves_use_one_named_stage2_setting():
    rows = synthetic.rows(pipelines=("music->chem",))
    with pytest.raises(ValueError, match=r"2 stage-2 settings .*\(0.001, 16\), \(0.002, 16\)"):
        report.lambda_curves(rows)
    with pytest.raises(ValueError, match=r"post=\(0.005, 16\); allowed: one of"):
        report.lambda_curves(rows, post=(5e-3, 16))
    for post_lr in (1e-3, 2e-3):
        curves = report.lambda_curves(rows, post=(post_lr, 16))
        assert set(curves) == {(False, 100_000), (False, 200_000), (True, 200_000)}
        assert [p.lam for p in curves[False, 200_000]] == [0.0, 0.5, 1.0]
        for key, curve in curves.items():
            for p in curve:
                (row,) = [
                    r
                    for r in rows
                    if (r["compute_matched"], r["pool_tokens"]) == key
                    and r["lam"] == p.lam
                    and r["post_lr"] == post_lr
                    and r["ft_lr"] == 5e-5
                    and not r["dropout"]
                    and not r["replay"]
                ]
                assert (p.L_im, p.L_ret, p.cap_hit) == (row["L_im"], row["L_ret"], False)
    one = [r for r in rows if r["post_lr"] == 1e-3]
    assert report.lambda_curves(one) == report.lambda_curves(rows, post=(1e-3, 16))
    paper_curves = report.lambda_curves(paper.rows())
    assert paper_curves[False, 300_000_000] == [
        (0.0, 1.405, 1.807, False),
        (0.5, 1.402, 1.719, False),
        (1.0, 1.402, 1.682, False),
    ]
    assert min(paper_curves[True, 300_000_000], key=lambda p: p.L_ret).lam == 0.5
    assert paper.COMPUTE_MATCHED_BEST_LAM[300_000_000] == 0.5


def test_paper_rows_hold_the_digitized_fig3_cells_and_nothing_else():
    rows = paper.rows()
    cells = {(r["compute_matched"], r["pool_tokens"], r["lam"]) for r in rows}
    assert cells == {(False, p, lam) for p in paper.POOLS for lam in (0.0, 0.5, 1.0)} | {
        (True, 300_000_000, lam) for lam in (0.0, 0.25, 0.5, 0.75, 1.0)
    }  # 14 of the figure's 30; the rest are not read off yet
    assert set(paper.COMPUTE_MATCHED_BEST_LAM) == set(paper.POOLS)
    added = {(r["pool_tokens"], r["lam"]): (r["L_im"], r["L_ret"]) for r in rows}
    assert added[30_000_000, 0.0] == (1.788, 2.175)
    assert added[150_000_000, 0.5] == (1.507, 1.819)
    matched = [r for r in rows if r["compute_matched"]]
    assert [(r["lam"], r["L_im"], r["L_ret"]) for r in matched][-1] == (1.0, 1.769, 1.912)


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


def test_method_figures_panels_and_counts():
    rows = synthetic.rows(pipelines=("music->chem",), seeds=(0, 1))
    for name in ("fig4", "fig5", "fig6"):
        fig = figures.draw_methods(rows, name)
        axes = fig.get_axes()
        assert len(axes) == 2 * 2  # two pools x (dropout, replay)
        small, big = axes[:2], axes[2:]  # the arms ran at the larger pool only
        for ax in small:
            assert len(ax.get_lines()) == 2  # unmixed, mixed
        panels = figures.METHOD_FIGURES[name][1]
        for ax, methods in zip(big, panels.values(), strict=True):
            assert len(ax.get_lines()) == 3  # a mean staircase per method
            assert [t.get_text() for t in ax.get_legend().get_texts()] == list(methods)
        y = figures.METHOD_FIGURES[name][0][1]
        assert big[0].get_ylabel().startswith(f"{y}: ")
        assert big[0].get_title().endswith(": dropout\nlower-left is better")
    only_replay = [r for r in rows if not r["dropout"]]
    assert list(figures.method_panels(only_replay, "fig4")) == ["replay"]
    with pytest.raises(ValueError, match="neither a dropout nor a replay arm"):
        figures.draw_methods([r for r in only_replay if not r["replay"]], "fig6")
    with pytest.raises(ValueError, match="figure 'fig7' unknown"):
        figures.method_panels(rows, "fig7")


def test_frontier_panel_draws_cap_hit_points_hollow_and_off_the_frontier():
    rows = synthetic.rows(pipelines=("music->chem",), pools=(100,), capped_post_lrs=(2e-3,))
    fig = figures.draw_frontiers(rows)
    ax = fig.get_axes()[0]
    plain = [r for r in rows if not r["compute_matched"] and r["method"] in ("unmixed", "mixed")]
    sizes = {m: sum(r["method"] == m for r in plain) // 2 for m in ("unmixed", "mixed")}
    # Per method: hollow cap-hit points, then the converged ones.
    assert _scatter_sizes(ax) == [sizes["unmixed"]] * 2 + [sizes["mixed"]] * 2
    hollow = ax.collections[0]
    assert len(hollow.get_facecolors()) == 0
    kept = [r for r in plain if r["method"] == "mixed" and r["post_lr"] == 1e-3]
    front = frontier.pareto_front(report.points(kept, ("L_ft", "L_ret")))
    np.testing.assert_allclose(ax.get_lines()[1].get_xdata(), front[:, 0])


def test_lambda_figure_counts_rings_and_paper_overlay():
    rows = synthetic.rows(pipelines=("music->chem",), seeds=(0, 1), capped_post_lrs=(1e-3,))
    with pytest.raises(ValueError, match="stage-2 settings"):
        figures.draw_lambda(rows)
    fig = figures.draw_lambda(rows, reference="paper", post=(1e-3, 16))
    axes = fig.get_axes()
    assert len(axes) == 4  # added and compute-matched, L_im and L_ret
    added, matched = axes[:2], axes[2:]
    for ax in added:
        assert len(ax.get_lines()) == 2 + 3 * 2  # two pools; three paper pools, each starred
        assert _scatter_sizes(ax) == [1, 3, 1, 3]  # per pool a star and three cap rings
        paper_stars = [ln for ln in ax.get_lines() if ln.get_marker() == "*"]
        assert len(paper_stars) == 3
    best_30m = min(paper.ADDED[30_000_000], key=lambda p: p[2])
    assert (paper_stars[0].get_xdata(), paper_stars[0].get_ydata()) == (0.5, best_30m[2])
    for ax in matched:
        assert _scatter_sizes(ax) == [1]  # compute-matched runs never hit a cap
    assert len(matched[0].get_lines()) == 1 + 2  # one pool; the paper's 300M and its star
    # L_ret: and the best λ of the paper's 30M and 150M curves, whose values are not digitized
    assert len(matched[1].get_lines()) == 1 + 2 + 2
    assert added[0].get_title().endswith("stage 2: LR 0.001, batch 16")
    star = added[1].collections[2].get_offsets()[0]
    curve = report.lambda_curves(rows, post=(1e-3, 16))[False, 200_000]
    best = min(curve, key=lambda p: p.L_ret)
    np.testing.assert_allclose(star, (best.lam, best.L_ret))
    paper_pools = [r for r in paper.rows() if r["pool_tokens"] == 30_000_000]
    mine = [dict(r, compute_matched=True, post_lr=1e-3, post_batch=16) for r in paper_pools]
    fig = figures.draw_lambda(mine, reference="paper")
    vlines = [ln for ln in fig.get_axes()[1].get_lines() if ln.get_linestyle() == ":"]
    assert [ln.get_xdata()[0] for ln in vlines] == [0.25, 0.25]
    assert "150M: best λ (values not digitized)" in vlines[1].get_label()


def test_draw_all_writes_what_rows_support(tmp_path):
    wd = str(tmp_path)
    synthetic.write(wd, synthetic.rows(pipelines=("music->chem",)))
    names = sorted(p.rsplit("/", 1)[1] for p in figures.draw_all(wd))
    stems = ("frontiers", "fig4", "fig5", "fig6", "lambda_music-chem_lr0.001_b16")
    stems += ("lambda_music-chem_lr0.002_b16",)
    assert names == sorted(f"{n}.{e}" for n in stems for e in ("png", "pdf"))
    plain = synthetic.rows(pipelines=("x->y",), lams=(0.0, 1.0), pools=(1,), variants=((0, 0),))
    plain = [r for r in plain if not r["compute_matched"] and r["post_lr"] == 1e-3]
    paths = figures.draw_all(str(tmp_path / "b"), rows=[r for r in plain if r["lam"] == 1.0])
    assert [p.rsplit("/", 1)[1] for p in paths] == ["frontiers.png", "frontiers.pdf"]
    assert (tmp_path / "b" / "figures" / "frontiers.pdf").stat().st_size > 0
    paths = figures.draw_all(str(tmp_path / "c"), rows=plain)
    assert [p.rsplit("/", 1)[1] for p in paths][2:] == ["lambda_x-y.png", "lambda_x-y.pdf"]


def test_lora_rows_in_the_same_directory_leave_the_lambda_analyses_unchanged():
    full = synthetic.rows(pipelines=("music->chem",), variants=((0.0, 0.0),))
    lora = [dict(r, lora_rank=64, L_ret=r["L_ret"] + 1.5, L_im=r["L_im"] + 0.5) for r in full]
    for r in lora:
        r["method"] = results.method_of(r)
    both = full + lora
    assert {r["method"] for r in lora} == {"mixed+lora", "unmixed+lora"} | {
        "mixed+lora (compute-matched)",
        "unmixed+lora (compute-matched)",
    }
    post = (1e-3, 16)
    assert report.lambda_curves(both, post=post) == report.lambda_curves(full, post=post)
    assert report.forgetting(both) == report.forgetting(full)
    assert report.to_json(report.summary(both)["settings"]) == report.to_json(
        report.summary(full)["settings"]
    )
