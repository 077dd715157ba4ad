"""The forecast probes against closed forms on a quadratic, their determinism over
meshes, their place in the smoke run's result files, and the validation's statistics."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as sp

from configs import default
from retention_jax import config, data, fileio, forecast, runtime, sharding, trainer
from retention_jax import steps as steps_lib
from retention_jax.analysis import forecast as fc
from retention_jax.analysis import report, results, stats

# L(θ) = ½ θᵀAθ + bᵀθ: gradient Aθ + b, Hessian A.
A_POST = np.array([[3.0, 1.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 0.5]], np.float32)
B_POST = np.array([0.5, -1.0, 0.25], np.float32)
A_FT = np.diag(np.array([1.0, 4.0, 2.0], np.float32))
B_FT = np.array([-1.0, 0.5, 1.0], np.float32)
THETA = {"w": jnp.array([0.3, -0.2, 0.7], jnp.float32)}


def quadratic(a, b):
    return lambda p: 0.5 * p["w"] @ jnp.asarray(a) @ p["w"] + jnp.asarray(b) @ p["w"]


L_POST, L_FT = quadratic(A_POST, B_POST), quadratic(A_FT, B_FT)


def test_hvp_is_the_hessian_times_the_vector():
    v = {"w": jnp.array([1.0, -2.0, 0.5], jnp.float32)}
    np.testing.assert_allclose(forecast.hvp(L_POST, THETA, v)["w"], A_POST @ v["w"], rtol=1e-6)
    unit, rayleigh = forecast.hvp_step(L_POST, THETA, v)
    h = A_POST @ np.asarray(v["w"])
    np.testing.assert_allclose(unit["w"], h / np.linalg.norm(h), rtol=1e-6)
    assert float(rayleigh) == pytest.approx(float(np.asarray(v["w"]) @ h), rel=1e-6)


def test_alignment_and_curvature_have_their_closed_forms():
    theta = np.asarray(THETA["w"])
    g_post, g_ft = A_POST @ theta + B_POST, A_FT @ theta + B_FT
    inter, cos = forecast.alignment(jax.grad(L_POST)(THETA), jax.grad(L_FT)(THETA))
    assert float(inter) == pytest.approx(-float(g_post @ g_ft), rel=1e-6)
    cosine = g_post @ g_ft / np.linalg.norm(g_post) / np.linalg.norm(g_ft)
    assert float(cos) == pytest.approx(-float(cosine), rel=1e-6)
    _, curv = forecast.hvp_step(L_POST, THETA, jax.grad(L_FT)(THETA))
    assert float(curv) == pytest.approx(float(g_ft @ A_POST @ g_ft), rel=1e-6)


def test_power_iteration_and_hutchinson_find_the_eigenvalue_and_trace():
    step = lambda v: forecast.hvp_step(L_POST, THETA, v)
    v0 = {"w": jnp.array([1.0, 1.0, 1.0], jnp.float32)}
    top = float(np.linalg.eigvalsh(A_POST).max())  # 3.618, next 1.382: converges fast
    assert forecast.power_iteration(step, v0, 30) == pytest.approx(top, rel=1e-5)
    diagonal = lambda v: forecast.hvp_step(L_FT, THETA, v)
    zs = [{"w": jnp.array(s, jnp.float32)} for s in ([1, -1, 1], [-1, -1, 1])]
    assert forecast.hutchinson(diagonal, zs) == pytest.approx(7.0, rel=1e-6)  # exact


def test_lookahead_of_a_quadratic_is_its_exact_adamw_step():
    static = dict(clip_norm=1.0, b1=0.9, b2=0.95, eps=1e-8, decay_exclude=("norm",))
    hp = {"lr": 0.1, "min_lr": 0.0, "warmup_steps": 0, "total_steps": 4, "weight_decay": 0.1}
    hp = {k: jnp.asarray(v, jnp.float32) for k, v in hp.items()}

    def update(p, o, g, s):
        return forecast.adamw_update(static, p, o, g, jnp.asarray(s), hp)

    opt = steps_lib.make_tx(static).init(THETA)
    curve = forecast.lookahead(jax.grad(L_FT), L_POST, update, THETA, opt, 1)
    theta = np.asarray(THETA["w"], np.float64)
    g = A_FT @ theta + B_FT
    g = g * min(1.0, 1.0 / np.linalg.norm(g))  # clipped; Adam's first step is g / |g|
    new = theta - 0.1 * (g / (np.abs(g) + 1e-8) + 0.1 * theta)  # lr 0.1 at step 0
    exact = 0.5 * new @ A_POST @ new + B_POST @ new
    assert curve == [pytest.approx(exact, rel=1e-5)]


def test_extrapolation_scales_the_rise_with_the_summed_lr():
    schedule = {"lr": 1e-3, "min_lr": 0.0, "warmup_steps": 1, "total_steps": 4, "weight_decay": 0}
    # warmup step 0 at 1e-3, then a cosine from 1e-3 at step 1 to 0 at step 4
    lrs = [
        1e-3,
        1e-3,
        1e-3 * 0.5 * (1 + np.cos(np.pi / 3)),
        1e-3 * 0.5 * (1 + np.cos(np.pi * 2 / 3)),
    ]
    assert forecast.cumulative_lr(schedule, 4) == pytest.approx(sum(lrs), rel=1e-6)
    assert forecast.extrapolate(2.0, 2.1, schedule, 1, 4) == pytest.approx(
        2.0 + 0.1 * sum(lrs) / lrs[0], rel=1e-6
    )
    assert forecast.lookahead_steps(0.25, 4) == 1
    assert forecast.lookahead_steps(0.25, 400) == 100


def _probes_on(devices: int, rt: runtime.Runtime | None = None) -> tuple[dict, runtime.Runtime]:
    """The probes of the smoke model's initialisation on two random batches."""
    exp = config.parse(default.get_config("smoke"), devices)
    mesh = sharding.make_mesh({"data": devices, "fsdp": 1, "tensor": 1}, jax.devices()[:devices])
    rt = rt or runtime.Runtime(mesh, exp.rules)
    fns = rt.step_functions(exp.model_for("posttrain"), exp.posttrain.optimizer)
    params = trainer.init_params(fns, 0)
    rng = np.random.default_rng(0)

    def batch():
        x = rng.integers(1, 256, (exp.eval_batch, exp.data.seq_len + 1)).astype(np.int32)
        rows = {
            "inputs": x[:, :-1],
            "targets": x[:, 1:],
            "segment_ids": np.ones_like(x[:, 1:]),
            "positions": np.tile(np.arange(exp.data.seq_len, dtype=np.int32), (len(x), 1)),
        }
        return data.to_global(rows, rt.mesh, fns.batch_sharding.spec)

    return forecast.probe(rt, fns, exp, params, batch(), batch()), rt


def _values(out: dict) -> dict:
    return {k: v["value"] for k, v in out.items() if isinstance(v, dict) and "value" in v}


def test_probes_are_deterministic_and_the_same_on_1_and_8_devices():
    (one, _), (eight, rt) = _probes_on(1), _probes_on(8)
    again, _ = _probes_on(8, rt)
    assert _values(eight) == _values(again)  # bit-identical reruns
    flat = lambda d: {k: v for k, v in _values(d).items() if k != "lookahead"}
    for name, value in flat(one).items():
        assert flat(eight)[name] == pytest.approx(value, rel=2e-3, abs=1e-5), name
    for lr, value in one["lookahead"]["value"].items():
        assert eight["lookahead"]["value"][lr] == pytest.approx(value, rel=1e-4)
    calls = {"interference": 3, "curvature": 1, "sharpness": 5, "trace": 2}
    for name, n in calls.items():
        assert one[name]["calls"] == n and one[name]["flops"] > 0
    assert one["lookahead"]["steps"] == 1 and one["lookahead"]["budget_steps"] == 4


def test_result_files_hold_the_probes_before_any_child_ran(smoke_workdir):
    rows = results.load(smoke_workdir)
    posts = {r["ids"]["posttrain"] for r in rows}
    assert len(posts) == 6
    for post in posts:
        path = os.path.join(smoke_workdir, "runs", post, "result.json")
        probes = fileio.read_json(path)["forecast"]
        assert set(forecast.PROBES) <= set(probes)
        assert set(probes["lookahead"]["value"]) == {"0.0001", "0.01"}
        assert all(np.isfinite(probes[p]["value"]) for p in forecast.PROBES if p != "lookahead")
        assert probes["stage3_flops"] > 0
        for r in rows:
            if r["ids"]["posttrain"] == post:
                assert r["forecast"] == probes
                child = os.path.join(smoke_workdir, "runs", r["ids"]["finetune"], "config.json")
                assert os.path.getmtime(path) <= os.path.getmtime(child)


def test_rho_equals_scipy_on_the_same_rows(smoke_workdir):
    rows = results.load(smoke_workdir)
    v = fc.validate(rows)
    for lr in {r["ft_lr"] for r in rows}:
        mine = [r for r in rows if r["ft_lr"] == lr]
        for name in fc.PREDICTORS:
            x = [fc.predictor(r, name) for r in mine]
            y = [r["L_ret"] for r in mine]
            c = v["L_ret"][lr][name]
            assert c["rho"] == pytest.approx(sp.spearmanr(x, y).statistic, abs=1e-12)
            assert c["tau"] == pytest.approx(sp.kendalltau(x, y).statistic, abs=1e-12)
            assert c["interval_over"] == "nodes" and c["nodes"] == 6
            lo, hi = c["rho95"]
            assert -1.0 <= lo <= hi <= 1.0
    assert v["cost"]["all"]["share_of_stage3"] > 0
    summary = report.to_json(report.summary(rows))["forecast"]
    assert summary == report.to_json(v)


def test_interval_over_replicates_is_the_t_interval_of_their_correlations():
    rng = np.random.default_rng(0)
    groups = [(x, x + rng.normal(size=9)) for x in rng.normal(size=(3, 9))]
    c = fc.correlation(groups)
    rhos = np.array([sp.spearmanr(x, y).statistic for x, y in groups])
    lo, hi = stats.t_interval(rhos)
    assert c["interval_over"] == "replicates" and c["replicates"] == 3
    assert c["rho"] == pytest.approx(rhos.mean(), abs=1e-12)
    assert c["rho95"] == pytest.approx((max(lo, -1.0), min(hi, 1.0)), abs=1e-12)
    assert c["rho95"][0] < rhos.min() < rhos.max() < c["rho95"][1]  # wider than their range


def test_a_probe_beats_l_im_only_by_a_resolved_paired_gain():
    preds = {
        "L_im": {"rho_per_replicate": [0.1, -0.2, 0.0]},
        "trace": {"rho_per_replicate": [0.7, 0.5, 0.6]},  # +0.6, +0.7, +0.6
        "sharpness": {"rho_per_replicate": [0.9, -0.9, 0.1]},  # +0.8, -0.7, +0.1
    }
    fc._against_baseline(preds)
    gain = preds["trace"]["gain_over_L_im"]
    assert gain["mean"] == pytest.approx(np.mean([0.6, 0.7, 0.6]))
    assert gain["ci95"] == pytest.approx(stats.t_interval(np.array([0.6, 0.7, 0.6])))
    assert "beats L_im +0.63" in fc._verdict(preds["trace"])
    assert "not resolved" in fc._verdict(preds["sharpness"])
    assert "gain_over_L_im" not in preds["L_im"]


def test_spearman_shares_ties_and_refuses_constants():
    assert fc.spearman([1, 2, 2, 3], [4, 3, 3, 1]) == pytest.approx(
        sp.spearmanr([1, 2, 2, 3], [4, 3, 3, 1]).statistic
    )
    assert np.isnan(fc.spearman([1, 1, 1], [1, 2, 3]))
