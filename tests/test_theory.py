"""The section-5 linear network reproduces the paper's three claims (default Config)."""

import dataclasses

import numpy as np
import pytest

from retention_jax.analysis import theory


@pytest.fixture(scope="module")
def result():
    cfg = theory.Config()
    runs = theory.compare(cfg)
    return cfg, runs, theory.claims(cfg, runs)


def test_tasks_follow_the_block_structure():
    cfg = theory.Config()
    t = theory.tasks(cfg)
    sig_pre, var_pre = t["pre"]
    sig_post, var_post = t["post"]
    spec = slice(cfg.n - cfg.n_specialized, cfg.n)
    assert np.all(np.asarray(var_pre[spec]) == 0) and np.all(np.asarray(t["ft"][1][spec]) == 0)
    assert np.all(np.asarray(sig_post[spec]) == cfg.beta)
    np.testing.assert_array_equal(sig_pre[: cfg.n_invariant], sig_post[: cfg.n_invariant])


def test_claim1_only_mixed_pretraining_learns_specialized_features(result):
    cfg, runs, c = result
    # Mixed: learned to within 1% of beta. Unmixed: no larger than 10x the initial scale.
    assert c["spec_after_pretrain_mixed"] == pytest.approx(cfg.beta, rel=0.01)
    assert c["spec_after_pretrain_unmixed"] < 10 * max(c["spec_init"], cfg.init_scale**2)
    # Invariant features are learned either way.
    for run in runs.values():
        assert theory.block_means(cfg, run)["pretrain"]["invariant"] == pytest.approx(
            cfg.sigma_invariant, rel=0.01
        )


def test_claim2_unmixed_post_training_distorts_inconsistent_features(result):
    cfg, runs, c = result
    assert c["L_im_unmixed"] == pytest.approx(c["L_im_mixed"], abs=0.01)  # same L_im
    assert c["pre_rise_unmixed"] > 0.05
    assert c["pre_rise_unmixed"] > 10 * max(c["pre_rise_mixed"], 1e-3)
    means = theory.block_means(cfg, runs["unmixed"])
    assert means["posttrain"]["inconsistent"] > means["pretrain"]["inconsistent"] + 0.1
    assert means["posttrain"]["specialized"] < 0.01 * cfg.beta  # the saddle holds


def test_claim3_fine_tuning_spares_specialized_features(result):
    cfg, runs, c = result
    assert c["delta_unmixed"] > 0.2
    assert abs(c["delta_mixed"]) < 0.1 * c["delta_unmixed"]
    spec = slice(cfg.n - cfg.n_specialized, cfg.n)
    mixed = runs["mixed"].singular
    np.testing.assert_allclose(mixed["finetune"][spec], mixed["posttrain"][spec], atol=1e-4)


def test_simulation_is_deterministic_and_untargeted_stage2_takes_every_step():
    cfg = dataclasses.replace(theory.Config(), steps=(2_000, 100, 100))
    a, b = theory.simulate(cfg, 0.0), theory.simulate(cfg, 0.0)
    np.testing.assert_array_equal(a.singular["finetune"], b.singular["finetune"])
    assert a.post_steps == 100


def test_command_prints_claims_and_writes_figure(tmp_path, capsys):
    out = tmp_path / "theory.png"
    theory.main([f"--out={out}"])
    printed = capsys.readouterr().out
    assert "(1)" in printed and "(3)" in printed and "delta = L_ret - L_im" in printed
    assert out.stat().st_size > 0
