"""The built-in experiment follows the paper's protocol; its summary comes from the rows."""

import json
import math
import os
import shutil

import numpy as np
import pytest

from configs import default
from retention_jax import config, data, experiment, stage
from retention_jax.analysis import report, results, synthetic


def _rows(workdir: str) -> list[dict]:
    return results.load(workdir)


def _post_results(workdir: str, cfg) -> dict:
    """Post-training node -> (its node, its result.json)."""
    nodes = [n for n in experiment.expand(cfg) if n.stage == "posttrain"]
    return {n.id: (n, stage.read_result(os.path.join(workdir, "runs", n.id))) for n in nodes}


def test_default_graph_sizes_follow_the_protocol():
    every = experiment.expand(default.get_config())
    assert sorted({n.replicate for n in every}) == [0, 1, 2]
    more = experiment.expand(default.get_config("replicates"))
    assert len(more) == 8 * 48 and {n.id for n in every} < {n.id for n in more}
    nodes = [n for n in every if n.replicate == 0]
    by_stage = {s: [n for n in nodes if n.stage == s] for s in config.STAGES}
    assert [len(v) for v in by_stage.values()] == [3, 9, 36]
    assert sorted(n.exp.pretrain.exposure.lam for n in by_stage["pretrain"]) == [0.0, 0.5, 1.0]
    top = next(n for n in by_stage["pretrain"] if n.exp.pretrain.exposure.lam == 1.0)
    tokens = data.plan("pretrain", top.exp).tokens
    assert tokens == {"pre": 163_840, "post": 8_192, "ft": 0}
    assert tokens["post"] / sum(tokens.values()) <= 0.05  # a few percent of stage 1
    for n in by_stage["posttrain"]:
        plan = data.plan("posttrain", n.exp)
        lam, pool = n.exp.pretrain.exposure.lam, n.exp.data.post_pool_tokens
        if n.exp.posttrain.compute_matched:
            assert not n.exp.early_stopping("posttrain")
            assert plan.tokens["post"] == round((1 - lam) * pool)  # the rest, one pass
        else:
            assert n.exp.early_stopping("posttrain")
            assert plan.tokens["post"] == 75 * pool  # the cap: 75 epochs of the pool


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="variant 'big' unknown; allowed: '' | 'replicates'"):
        default.get_config("big")


@pytest.mark.slow
def test_smoke_every_added_post_node_stops_early_after_epochs(smoke_workdir):
    c = default.get_config("smoke")
    runs = _post_results(smoke_workdir, c)
    added = [(n, r) for n, r in runs.values() if not n.exp.posttrain.compute_matched]
    assert len(added) == 3
    patience = c.posttrain.early_stop.patience
    for n, r in added:
        assert r["stopped_early"] and r["steps"] < r["planned_steps"], n.id
        steps, losses = zip(*r["evals"])
        assert r["result_step"] == steps[int(np.argmin(losses))]
        assert len(steps) - 1 - int(np.argmin(losses)) == patience
        # the pool was repeated: more D_post tokens than the pool holds
        assert r["tokens"]["post"] > c.data.post_pool_tokens


@pytest.mark.slow
def test_smoke_lambda_rows_for_both_arms(smoke_workdir):
    c = default.get_config("smoke")
    rows = _rows(smoke_workdir)
    assert len(rows) == 12
    ft_lrs = c.sweep.finetune[0][1]
    for cm in (False, True):
        mine = [r for r in rows if r["compute_matched"] == cm]
        assert sorted((r["lam"], r["ft_lr"]) for r in mine) == sorted(
            (lam, lr) for lam in default.LAMS for lr in ft_lrs
        )
    curves = report.lambda_curves(rows)
    assert {cm: [p.lam for p in pts] for (cm, _), pts in curves.items()} == {
        False: list(default.LAMS),
        True: list(default.LAMS),
    }


@pytest.mark.slow
def test_smoke_compute_matched_reuses_pretraining_and_takes_one_pass(smoke_workdir):
    c = default.get_config("smoke")
    rows = _rows(smoke_workdir)
    pool = c.data.post_pool_tokens
    pre_of = {r["lam"]: r["ids"]["pretrain"] for r in rows if not r["compute_matched"]}
    matched = [r for r in rows if r["compute_matched"]]
    assert matched and {r["lam"] for r in matched} == set(default.LAMS)
    batch_tokens = c.posttrain.batch * c.data.seq_len
    for r in matched:
        assert r["ids"]["pretrain"] == pre_of[r["lam"]]
        seen = r["tokens"]["pretrain"]["post"] + r["tokens"]["posttrain"]["post"]
        assert seen == pool  # one pass over the pool in total
        assert (
            r["post_steps"]
            == r["post_planned_steps"]
            == math.ceil((1 - r["lam"]) * pool / batch_tokens)
        )
        assert not r["post_stopped_early"]
    lam1 = next(r for r in matched if r["lam"] == 1.0)
    assert lam1["post_steps"] == 0 and lam1["L_im"] == pytest.approx(
        stage.read_result(os.path.join(smoke_workdir, "runs", lam1["ids"]["pretrain"]))["val"][
            "post"
        ]
    )


def _synthetic(capped=()) -> list[dict]:
    rows = synthetic.rows(
        pipelines=("music->chem",),
        pools=(100_000,),
        variants=((0.0, 0.0),),
        capped_post_lrs=capped,
    )
    for r in rows:
        r["tokens"] = {"pretrain": {"pre": 1_000, "post": round(50 * r["lam"]), "ft": 0}}
    return rows


def _law(lam: float, cm: bool, post_lr: float, ft_lr: float) -> tuple[float, float]:
    """synthetic.py's (L_im, L_ret) at seed 0 and a 100k pool, written out again."""
    push = math.log10(ft_lr / 1e-5) / 2
    noise = 0.01 * math.sin(3 * lam + 1e3 * post_lr + 7 * push)
    l_im = 1.5 + 0.1 * cm * lam**2 + 30 * (post_lr - 1e-3)
    return l_im + noise, l_im + (0.6 - 0.3 * lam) * push + noise


def test_summary_is_computed_from_the_results_file(tmp_path):
    synthetic.write(str(tmp_path), _synthetic())
    rows = results.load(str(tmp_path))
    s = report.summary(rows)
    assert s["convergence"] == {
        "runs": 6,
        "stopped_early": 6,
        "all_converged": True,
        "max_cap_used": 0.4,
    }
    assert s["share"] == {100_000: pytest.approx(50 / 1_050)}
    assert s["ft_lr"] == 5e-5
    assert list(s["settings"]) == [(1e-3, 16, 100_000), (2e-3, 16, 100_000)]
    for (post_lr, _, _), c in s["settings"].items():
        for cm, key in ((False, "added"), (True, "compute_matched")):
            got = [(p.lam, p.L_im, p.L_ret) for p in c[key]]
            want = [(lam, *_law(lam, cm, post_lr, 5e-5)) for lam in (0.0, 0.5, 1.0)]
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
        assert c["L_ret_by_ft_lr"] == {
            lr: [pytest.approx(_law(lam, False, post_lr, lr)[1], abs=1e-12) for lam in (0, 0.5, 1)]
            for lr in (5e-5, 2e-4, 1e-3)
        }
        l_im = [_law(lam, False, post_lr, 5e-5)[0] for lam in (0.0, 0.5, 1.0)]
        assert c["L_im_spread"] == pytest.approx(max(l_im) - min(l_im), abs=1e-12)
        l_ret = {lam: _law(lam, True, post_lr, 5e-5)[1] for lam in (0.0, 0.5, 1.0)}
        assert c["best_lam"] == min(l_ret, key=l_ret.get) == 0.5
    for ft_lr, v in s["forgetting"].items():
        mine = [r for r in rows if r["ft_lr"] == ft_lr]
        assert len(mine) == 12
        assert v == pytest.approx(np.median([(r["L_ret"] - r["L_im"]) / r["L_im"] for r in mine]))
    added = [r for r in rows if not r["compute_matched"]]
    extremes = [r for r in added if r["lam"] in (0.0, 1.0)]  # mixed: the largest λ
    assert report.to_json(s["frontiers"]) == report.to_json(report.compare(extremes))
    assert s["frontiers"]["music->chem, |D_post| 100K"]["(L_ft, L_ret)"]["b_dominated_by_a"] == 1.0
    text = report.format_summary(s)
    assert "stage 2 converged: yes (6 of 6 runs stopped early" in text
    assert "exposure share of stage 1 at the largest λ: 4.8% (|D_post| 100K)" in text

    # One changed line of the file changes the reading it feeds, and nothing else.
    path = os.path.join(str(tmp_path), "results.jsonl")
    with open(path) as f:
        edited = [json.loads(line) for line in f]
    target = next(
        r
        for r in edited
        if r["lam"] == 1.0 and not r["compute_matched"] and r["post_lr"] == 1e-3
        if r["ft_lr"] == 5e-5
    )
    target["L_ret"] = 9.0
    synthetic.write(str(tmp_path), edited)
    again = report.summary(results.load(str(tmp_path)))
    assert again["settings"][1e-3, 16, 100_000]["added"][-1].L_ret == 9.0
    assert again["settings"][2e-3, 16, 100_000] == s["settings"][2e-3, 16, 100_000]


def test_summary_counts_capped_runs():
    s = report.summary(_synthetic(capped=(2e-3,)))
    assert s["convergence"] == {
        "runs": 6,
        "stopped_early": 3,
        "all_converged": False,
        "max_cap_used": 1.0,
    }
    assert "stage 2 converged: NO (3 of 6 runs stopped early" in report.format_summary(s)


@pytest.mark.slow
def test_smoke_with_two_replicates_writes_the_summary_of_its_rows(smoke_run, tmp_path):
    """Replicate 0 is the smoke graph itself (reused); replicate 1 trains on other pools."""
    workdir = str(tmp_path / "two")
    shutil.copytree(smoke_run[0], workdir)
    c = default.get_config("smoke")
    c.replicates = 2
    rows = experiment.run(c, workdir, rt=smoke_run[1])
    s = report.write_summary(workdir, rows)
    assert sorted({(r["replicate"], r["seed"], r["data_seed"]) for r in rows}) == [
        (0, 0, 0),
        (1, 1, 1),
    ]
    with open(os.path.join(workdir, report.SUMMARY)) as f:
        written = json.load(f)
    assert written == report.to_json(report.summary(results.load(workdir)))
    assert written["replicates"] == [0, 1]
    gap = written["effects"]["music->chem, |D_post| 2.05K"][report.PRIMARY]["effect"]
    # Each replicate's value recomputed from its own rows of results.jsonl.
    for r, value in zip(gap["replicates"], gap["values"], strict=True):
        mine = [x for x in results.load(workdir) if x["replicate"] == r]
        one = report.compare([x for x in mine if not x["compute_matched"] and x["lam"] != 0.5])
        assert value == pytest.approx(one["music->chem, |D_post| 2.05K"]["(L_ft, L_ret)"]["gap"])
    at = s["effects"]["music->chem, |D_post| 2.05K"]["L_ret gap at stage-3 LR 0.0001"]["effect"]
    want = {}  # per replicate: unmixed minus mixed L_ret, where both converged
    for r in range(2):
        l_ret = {
            x["lam"]: x["L_ret"]
            for x in rows
            if x["replicate"] == r and x["ft_lr"] == 1e-4 and not x["compute_matched"]
            if not report.cap_hit(x)
        }
        if 0.0 in l_ret and 1.0 in l_ret:
            want[r] = l_ret[0.0] - l_ret[1.0]
    assert dict(zip(at.replicates, at.values, strict=True)) == pytest.approx(want)
    assert "L_ret gap at stage-3 LR 0.0001" in report.format_effects(s["effects"])
