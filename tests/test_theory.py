"""The section-5 network under the paper's protocol: what holds, what does not, and why.

Golden values come from closed forms of the diagonal dynamics where they exist: the logistic
solution of stage 1, the proximal fixed point (σ_post + λθ0)/(1 + λ) of stage 2 and the D_ft
optimum of stage 3.
"""

import dataclasses
import json
import math

import numpy as np
import pytest

from retention_jax.analysis import theory

CFG = theory.Config()


@pytest.fixture(scope="module")
def rep():
    return theory.report(CFG)


@pytest.fixture(scope="module")
def runs():
    return theory.compare(CFG)


def test_tasks_follow_the_block_structure():
    t = theory.tasks(CFG)
    b = theory.blocks(CFG)
    spec = b["specialized"]
    assert np.all(t["pre"][1][spec] == 0) and np.all(t["ft"][1][spec] == 0)
    np.testing.assert_array_equal(t["post"][1], np.ones(CFG.n))
    np.testing.assert_allclose(t["post"][0][spec], [CFG.beta] * CFG.n_specialized, rtol=1e-7)
    np.testing.assert_array_equal(t["pre"][0][b["inconsistent"]], [1.0, 1.0])
    np.testing.assert_array_equal(t["post"][0][b["inconsistent"]], [2.0, 2.0])
    assert CFG.c_mis == 1.0


@pytest.mark.parametrize(
    "override, message",
    [
        ({"beta": 0.6}, r"config key beta=0.6: must lie in \(0, c_mis/2\) = \(0, 0.5\)"),
        ({"alpha": 1.5}, r"config key alpha=1.5: must lie in \[0, 1\]"),
        ({"sigma_inconsistent": (1.0, -2.0, 1.0)}, r"config key sigma_inconsistent=\(1.0, -2.0"),
        ({"sigma_invariant": 1.5}, r"config key sigma_invariant=1.5: must exceed every"),
        ({"lr": 0.1}, r"config key lr=0.1: must lie in \(0, 1/\(2\(1\+lam\)·sigma_invariant\)\)"),
        ({"K": -1}, r"config key K=-1: must be an integer >= 0"),
    ],
)
def test_bad_config_names_key_value_and_what_is_allowed(override, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(CFG, **override)


def test_a_batch_point_may_set_only_what_the_batch_varies():
    with pytest.raises(ValueError, match=r"config key beta=0.3: a point may set only \("):
        theory.simulate(CFG, [{"beta": 0.3}])
    with pytest.raises(ValueError, match=r"config key T=-1.0: must be > 0"):
        theory.simulate(CFG, [{"T": -1.0}])


def test_identity_init_keeps_theta_diagonal_and_non_negative(runs):
    for run in runs.values():
        assert run.offdiag == 0.0
        assert min(float(sv.min()) for sv in run.singular.values()) >= 0.0
        np.testing.assert_allclose(run.singular["init"], math.exp(-2 * CFG.T), rtol=1e-6)


def test_claim1_only_mixed_pretraining_learns_specialized_features(runs):
    b = theory.blocks(CFG)
    mixed, unmixed = runs["mixed"].singular["pretrain"], runs["unmixed"].singular["pretrain"]
    # Mixture covariance α on the block: logistic growth at rate 4αβ toward β (not αβ).
    theta0, t1, ab = math.exp(-2 * CFG.T), CFG.lr * CFG.steps_pretrain, CFG.alpha * CFG.beta
    logistic = CFG.beta / (1 + (CFG.beta / theta0 - 1) * math.exp(-4 * ab * t1))
    assert logistic == pytest.approx(0.3701, abs=1e-4)
    np.testing.assert_allclose(mixed[b["specialized"]], logistic, rtol=2e-3)
    assert mixed[b["specialized"]].min() > 30 * ab
    # Unmixed: zero input variance, zero gradient; the block stays exactly at its init.
    np.testing.assert_allclose(unmixed[b["specialized"]], theta0, rtol=1e-6)
    # C.6 dropped: the mixed model learns the mixture's inconsistent compromise.
    pre, post, _ = CFG.sigma_inconsistent
    compromise = (1 - CFG.alpha) * pre + CFG.alpha * post
    np.testing.assert_allclose(mixed[b["inconsistent"]], compromise, rtol=1e-4)
    np.testing.assert_allclose(unmixed[b["inconsistent"]], pre, rtol=1e-4)
    np.testing.assert_allclose(mixed[b["invariant"]], CFG.sigma_invariant, rtol=1e-4)


def test_claim2_both_models_distort_inconsistent_features_under_the_protocol(rep):
    c = rep["protocol"]
    pre, post, _ = CFG.sigma_inconsistent
    lam = CFG.lam
    for name, start in (("unmixed", pre), ("mixed", (1 - CFG.alpha) * pre + CFG.alpha * post)):
        fixed_point = (post + lam * start) / (1 + lam)
        assert c[f"inc_after_posttrain_{name}"] == pytest.approx(fixed_point, abs=1e-3)
        rise = CFG.n_inconsistent * ((fixed_point - pre) ** 2 - (start - pre) ** 2)
        assert c[f"pre_rise_{name}"] == pytest.approx(rise, abs=2e-3)
    assert c["pre_rise_unmixed"] == pytest.approx(0.5, abs=1e-3)
    assert c["pre_rise_mixed"] == pytest.approx(0.5286, abs=1e-3)
    # Not as claimed: the mixed model raises the D_pre loss at least as much.
    assert c["pre_rise_mixed"] >= c["pre_rise_unmixed"]
    # The unmixed specialized features stay at the saddle for K = 100 steps.
    assert c["spec_after_posttrain_unmixed"] < 0.02 * CFG.beta
    assert c["spec_after_posttrain_mixed"] == pytest.approx(0.385, abs=1e-3)


def test_claim3_zero_projection_holds_but_delta_mixed_is_not_zero(rep):
    c = rep["protocol"]
    _, post, ft = CFG.sigma_inconsistent
    assert c["delta_specialized_mixed"] == 0.0 and c["delta_specialized_unmixed"] == 0.0
    for name in theory.MODELS:
        inc2 = c[f"inc_after_posttrain_{name}"]
        closed = CFG.n_inconsistent * ((ft - post) ** 2 - (inc2 - post) ** 2)
        assert c[f"delta_{name}"] == pytest.approx(closed, abs=2e-3)
    assert c["delta_unmixed"] == pytest.approx(1.5, abs=2e-3)
    assert c["delta_mixed"] == pytest.approx(1.5296, abs=2e-3)
    assert c["delta_mixed"] > c["delta_unmixed"]
    # What early exposure buys is L_ret, through the retained specialized features.
    assert c["L_ret_mixed"] == pytest.approx(2.0004, abs=1e-3)
    assert c["L_ret_unmixed"] == pytest.approx(2.3077, abs=1e-3)


def test_lower_bound_is_vacuous_at_lam_1_and_applies_without_the_proximal_pull(rep):
    assert rep["protocol"]["bound_eps"] == pytest.approx(0.5, abs=1e-3)
    assert rep["protocol"]["bound_bound"] == pytest.approx(2 * (1 - 0.8 - 1), abs=5e-3)
    assert not rep["protocol"]["bound_applies"] and rep["protocol"]["bound_holds"]
    by_lam = {p["lam"]: p for p in rep["sweep_lam"]}
    assert set(by_lam) == set(theory.LAM_SWEEP)
    p0 = by_lam[0.0]
    assert p0["bound_eps"] == pytest.approx(p0["spec_after_posttrain_unmixed"], rel=1e-3)
    assert p0["bound_applies"] and p0["bound_holds"]
    assert p0["bound_bound"] == pytest.approx(1.943, abs=2e-3)
    assert p0["delta_unmixed"] == pytest.approx(2.0, abs=2e-3)
    assert by_lam[0.1]["bound_applies"] and by_lam[0.1]["bound_holds"]


def test_gap_is_not_made_by_unequal_stage2_lengths(rep):
    points = rep["sweep_K"]
    assert [p["K"] for p in points] == list(theory.SWEEPS["K"])
    for p in points:
        assert p["post_steps_mixed"] == p["post_steps_unmixed"] == p["K"]
    # Once the inconsistent block has converged (K >= 30) K moves both Δ alike: the gap is fixed.
    gaps = [p["delta_mixed"] - p["delta_unmixed"] for p in points if p["K"] >= 30]
    assert max(gaps) - min(gaps) < 2e-3
    assert gaps[0] == pytest.approx(0.0296, abs=2e-3)
    # More steps let the unmixed model learn the specialized block, to β/(1+λ).
    assert points[-1]["spec_after_posttrain_unmixed"] == pytest.approx(0.2, abs=1e-3)
    assert points[-1]["L_ret_unmixed"] == pytest.approx(2.08, abs=2e-3)
    # The stopping rule alone gives different lengths and a gap of the opposite sign.
    m = rep["matched_stop_illustration"]
    assert m["post_steps_mixed"] == 0 and m["post_steps_unmixed"] == 2
    assert m["delta_mixed"] == pytest.approx(0.1182, abs=2e-3)
    assert m["delta_unmixed"] == pytest.approx(0.5727, abs=2e-3)


def test_identical_stage1_gives_identical_models_for_every_k():
    cfg = dataclasses.replace(CFG, steps_pretrain=1_000, steps_finetune=100)
    a, b, c, d = theory.simulate(cfg, [{"alpha": 0.0, "K": k} for k in (10, 10, 300, 300)])
    for x, y in ((a, b), (c, d)):
        for stage in theory.STAGES:
            np.testing.assert_array_equal(x.singular[stage], y.singular[stage])
        assert x.delta == y.delta
    assert (a.post_steps, c.post_steps) == (10, 300)


def test_claim1_holds_only_in_a_window_of_T(rep):
    points = {p["T"]: p for p in rep["sweep_T"]}
    assert points[3.0]["spec_after_pretrain_mixed"] > 0.98 * CFG.beta
    assert points[8.0]["spec_after_pretrain_mixed"] < 0.01 * CFG.beta
    assert points[5.0]["spec_after_pretrain_mixed"] == pytest.approx(0.2504, abs=1e-3)
    deltas = [(p["delta_mixed"], p["delta_unmixed"]) for p in rep["sweep_T"]]
    np.testing.assert_allclose(deltas, [deltas[0]] * len(deltas), atol=1e-3)
    assert points[1.0]["L_ret_unmixed"] - points[1.0]["L_ret_mixed"] < 0.05
    assert points[4.0]["L_ret_unmixed"] - points[4.0]["L_ret_mixed"] > 0.3


def test_command_prints_json_and_writes_figure(tmp_path, capsys):
    out = tmp_path / "theory.png"
    theory.main(["--json", f"--out={out}"])
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) == {
        "config",
        "protocol",
        "sweep_T",
        "sweep_K",
        "sweep_lam",
        "matched_stop_illustration",
    }
    assert printed["protocol"]["post_steps_mixed"] == CFG.K
    assert out.stat().st_size > 10_000


@pytest.fixture(scope="module")
def phase():
    return theory.phase_diagram(CFG)


def _cell(phase, c6: str, x: str, y: str, at_x, at_y) -> dict:
    p = phase["panels"][c6, x, y]
    i, j = p["y"].index(at_y), p["x"].index(at_x)
    return {k: float(v[i, j]) for k, v in p.items() if k not in ("x", "y")}


def test_phase_engine_reproduces_the_full_matrix_simulation(rep, phase):
    c = rep["protocol"]
    cell = _cell(phase, "dropped", "T", "K", CFG.T, CFG.K)
    for name in theory.MODELS:
        for key in ("L_im", "L_ret", "delta"):
            assert cell[f"{key}_{name}"] == pytest.approx(c[f"{key}_{name}"], abs=2e-4)
    assert cell["bound"] == pytest.approx(c["bound_bound"], abs=1e-3)
    with pytest.raises(ValueError, match=r"config key n=3: a point may set only \("):
        theory.phase_points(CFG, [{"n": 3}])


def test_phase_diagram_without_stage2_matches_the_closed_form(phase):
    """K = 0: stage 1 converges the inconsistent block (mixed: to the compromise, or left at
    exp(-2T) with C.6 imposed), stage 3 moves it to σ_ft, the specialized block never moves."""
    pre, post, ft = CFG.sigma_inconsistent
    k, a, b = CFG.n_inconsistent, CFG.alpha, CFG.beta
    compromise = (1 - a) * pre + a * post
    for t in theory.GRIDS["T"]:
        cell = _cell(phase, "dropped", "T", "K", t, 0)
        assert cell["delta_unmixed"] == pytest.approx(0.0, abs=1e-4)
        closed = k * ((ft - post) ** 2 - (compromise - post) ** 2)  # = k (1 - (1-α)²) c_mis²
        assert cell["d_delta"] == pytest.approx(closed, abs=1e-4)
        imposed = _cell(phase, "imposed", "T", "K", t, 0)
        closed = k * ((ft - post) ** 2 - (math.exp(-2 * t) - post) ** 2)
        assert imposed["delta_mixed"] == pytest.approx(closed, abs=1e-3)
    cell = _cell(phase, "dropped", "T", "K", 4.0, 0)
    theta0, t1 = math.exp(-8.0), CFG.lr * CFG.steps_pretrain
    spec = b / (1 + (b / theta0 - 1) * math.exp(-4 * a * b * t1))  # logistic, rate 4αβ
    closed = CFG.n_specialized * ((spec - b) ** 2 - (theta0 - b) ** 2)
    assert cell["d_ret"] == pytest.approx(closed, abs=2e-3)


def test_converged_unregularised_stage2_makes_the_models_identical(phase):
    """λ = 0, K = 3000: both models reach A_post, so both forget k (σ_ft - σ_post)²."""
    _, post, ft = CFG.sigma_inconsistent
    closed = CFG.n_inconsistent * (ft - post) ** 2
    for c6 in theory.C6_MODES:
        cell = _cell(phase, c6, "lam", "K", 0.0, 3000)
        for name in theory.MODELS:
            assert cell[f"delta_{name}"] == pytest.approx(closed, abs=1e-3)
            assert cell[f"L_ret_{name}"] == pytest.approx(closed, abs=1e-3)


def test_phase_diagram_reading(phase):
    s = theory.phase_summary(phase)
    for name, p in s.items():
        assert p["c4_and_c6"] == 0, name  # no cell meets every stated assumption
        assert p["d_ret_range"][1] < 1e-4, name  # mixed never retains worse
        assert p["bound_holds"] == p["bound_applies"], name
        if name.startswith("dropped"):  # mixed forgets at least as much, everywhere
            assert p["d_delta_range"][0] > -1e-4, name
    assert s["imposed:TxK"]["delta_mixed_below_unmixed"] == s["imposed:TxK"]["cells"]
    applies = phase["panels"]["dropped", "lam", "K"]["bound_applies"]
    lam, k = np.nonzero(applies.T)
    assert {theory.GRIDS["lam"][i] for i in lam} == {0.0, 0.03, 0.1, 0.3}
    assert {theory.GRIDS["K"][i] for i in k} == {30, 100}
    c6 = phase["panels"]["dropped", "alpha", "beta"]["c6"]
    assert c6.sum() == 5 and min(theory.GRIDS["beta"][i] for i in np.nonzero(c6)[0]) == 2.4


def test_phase_command_prints_summary_and_the_figure_marks_the_default(phase, capsys):
    theory.main(["--phase", "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(theory.phase_summary(phase)))
    fig = theory.draw_phase(phase)
    axes = fig.get_axes()[::2]  # each panel is followed by its colorbar
    assert len(axes) == 4 * len(theory.PANELS)
    stars = [ln for ln in axes[0].get_lines() if ln.get_marker() == "*"]
    assert [(s.get_xdata(), s.get_ydata()) for s in stars] == [(3.5, 4.5)]  # T = 4, K = 100
