"""Stage plans: exact exposure, replay and compute-matched budgets as pure index maps."""

import ml_collections as mlc
import numpy as np
import pytest

from configs import base
from retention_jax import config, data, graph
from retention_jax.data.permute import epoch_permute, permute

S = 32  # seq_len: the rounding unit is one sequence of S target tokens
POOL = 400  # D_post pool in sequences


def raw(**kw):
    c = base.get_config()
    c.data.seq_len = S
    c.data.val_tokens = 4 * S
    c.data.post_pool_tokens = POOL * S
    c.data.ft_pool_tokens = 100 * S
    c.pretrain.tokens = 2000 * S
    c.pretrain.batch = 16
    c.posttrain.batch = 16
    c.posttrain.max_tokens = 16 * S * 100
    c.finetune.tokens = 250 * S
    c.finetune.batch = 16
    c = mlc.ConfigDict(c.to_dict(), type_safe=False)
    for k, v in kw.items():
        config.assign(c, k, v)
    return c


def cfg(**kw):
    return config.parse(raw(**kw), 8)


def stream(plan):
    return plan.lookup(np.arange(plan.num_steps * plan.batch))


def test_permute_is_bijection():
    for n in (1, 2, 7, 100, 1000, 4099):
        p = permute(np.arange(n), n, 123)
        assert sorted(p.tolist()) == list(range(n))
    e = epoch_permute(np.arange(300), 100, 5)
    assert [sorted(e[i : i + 100].tolist()) == list(range(100)) for i in (0, 100, 200)] == [
        True
    ] * 3
    assert not np.array_equal(e[:100], e[100:200])  # a new order every epoch


@pytest.mark.parametrize("lam", [0.0, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("mode", ["add", "replace"])
def test_exposure_exact_once_uniform(lam, mode):
    p = data.plan("pretrain", cfg(**{"pretrain.exposure.lam": lam, "pretrain.exposure.mode": mode}))
    e = round(lam * POOL)
    dom, seq = stream(p)
    post = np.nonzero(dom == 1)[0]
    assert len(post) == e and p.tokens["post"] == e * S == round(lam * POOL * S)
    assert len(set(seq[post].tolist())) == e  # each pool sequence at most once
    assert seq[post].min(initial=0) >= 0 and seq[post].max(initial=0) < POOL
    pre = seq[dom == 0]
    assert len(pre) == (2000 if mode == "add" else 2000 - e) and len(set(pre.tolist())) == len(pre)
    assert p.tokens["pre"] == len(pre) * S
    assert (dom == -1).sum() == p.num_steps * p.batch - len(pre) - e  # only the last batch pads
    assert p.num_steps == -(-(len(pre) + e) // 16)
    if e > 1:
        gaps = np.diff(np.r_[post, post[0] + len(pre) + e])  # cyclic gaps
        assert gaps.max() / gaps.mean() <= 1.25


def test_exposure_nested_in_lambda():
    sets = [
        set(
            stream(data.plan("pretrain", cfg(**{"pretrain.exposure.lam": lam})))[1][
                stream(data.plan("pretrain", cfg(**{"pretrain.exposure.lam": lam})))[0] == 1
            ].tolist()
        )
        for lam in (0.25, 0.5)
    ]
    assert sets[0] < sets[1]


def test_exposure_window():
    p = data.plan(
        "pretrain", cfg(**{"pretrain.exposure.lam": 0.5, "pretrain.exposure.window": (0.8, 1.0)})
    )
    dom, _ = stream(p)
    post = np.nonzero(dom == 1)[0]
    total = 2000 + 200
    assert len(post) == 200 and post.min() >= int(0.8 * total) and post.max() < total


def test_replay_fraction():
    p = data.plan("posttrain", cfg(**{"posttrain.replay": 0.01}))
    dom, seq = stream(p)
    n = p.num_steps * p.batch
    assert p.num_steps == 100 and (dom == -1).sum() == 0
    assert abs((dom == 0).sum() - 0.01 * n) <= 1  # within one sequence
    assert p.tokens["pre"] == (dom == 0).sum() * S and seq[dom == 0].max() < 2000
    gaps = np.diff(np.nonzero(dom == 0)[0])
    assert gaps.max() - gaps.min() <= 1
    # stage 2 repeats its pool in epochs: each epoch of 400 sequences is a permutation
    post = seq[dom == 1]
    assert sorted(post[:POOL].tolist()) == list(range(POOL))


@pytest.mark.parametrize("mode", ["add", "replace"])
def test_replay_draws_only_sequences_stage1_saw(mode):
    c = cfg(
        **{"posttrain.replay": 0.2, "pretrain.exposure.lam": 0.5, "pretrain.exposure.mode": mode}
    )
    d1, s1 = stream(data.plan("pretrain", c))
    d2, s2 = stream(data.plan("posttrain", c))
    seen, replayed = set(s1[d1 == 0].tolist()), s2[d2 == 0].tolist()
    assert len(seen) == (2000 if mode == "add" else 1800)
    assert set(replayed) <= seen
    assert len(set(replayed)) == len(replayed) == 320  # fewer slots than seen: no repeats


@pytest.mark.parametrize("lam", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_compute_matched_disjoint_parts(lam):
    c = cfg(**{"pretrain.exposure.lam": lam, "posttrain.compute_matched": True})
    d1, s1 = stream(data.plan("pretrain", c))
    p2 = data.plan("posttrain", c)
    d2, s2 = stream(p2)
    a, b = s1[d1 == 1].tolist(), s2[d2 == 1].tolist()
    assert len(set(a)) == len(a) and len(set(b)) == len(b)  # single passes
    assert not set(a) & set(b) and sorted(a + b) == list(range(POOL))
    assert p2.num_steps == -(-(POOL - round(lam * POOL)) // 16)
    assert p2.tokens["post"] == (POOL - round(lam * POOL)) * S


def test_compute_matched_with_replay():
    c = cfg(
        **{
            "pretrain.exposure.lam": 0.5,
            "posttrain.compute_matched": True,
            "posttrain.replay": 0.01,
        }
    )
    d, _ = stream(data.plan("posttrain", c))
    assert (d == 1).sum() == 200 and (d == 0).sum() == round(0.01 * 200 / 0.99)


def test_finetune_budget_repeats_pool():
    p = data.plan("finetune", cfg())
    d, s = stream(p)
    assert (d == 2).sum() == 250 and p.tokens["ft"] == 250 * S and p.num_steps == 16
    assert sorted(s[:100].tolist()) == list(range(100)) and p.needs["ft"] == 100


def test_seed_changes_order_not_counts():
    a = stream(data.plan("pretrain", cfg(**{"pretrain.exposure.lam": 0.5})))
    b = stream(data.plan("pretrain", cfg(**{"pretrain.exposure.lam": 0.5})))
    c = stream(data.plan("pretrain", cfg(**{"pretrain.exposure.lam": 0.5, "seed": 1})))
    assert np.array_equal(a[1], b[1]) and not np.array_equal(a[1], c[1])
    assert np.array_equal(a[0], c[0])  # placement is the same, the order differs
    # the stage name is folded into the seed: stage 2 and stage 3 orders are unrelated
    assert data.plan("pretrain", cfg()).main.key != data.plan("finetune", cfg()).main.key


def test_summary_is_json():
    s = data.plan("pretrain", cfg(**{"pretrain.exposure.lam": 0.25})).summary()
    assert s["tokens"] == {"pre": 2000 * S, "post": 100 * S, "ft": 0} and s["num_steps"] == 132


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("data.packing", "zip", "data.packing='zip'"),
        ("data.tokenizer", "word", "data.tokenizer='word'"),
        ("data.seq_len", 0, "data.seq_len=0"),
        ("data.val_fraction", 1.5, "data.val_fraction=1.5"),
        ("data.val_tokens", 3, "data.val_tokens=3"),
        ("data.pre.source", "ftp:x", "data.pre.source='ftp:x'"),
        ("data.post.source", "builtin:poetry", "builtin:poetry"),
        ("data.post.options", {"overlap": 2.0}, "data.post.options.overlap=2.0"),
        ("data.ft.options", {"colour": 1}, "colour"),
        ("pretrain.exposure.lam", 1.5, "pretrain.exposure.lam=1.5"),
        ("pretrain.exposure.mode", "swap", "pretrain.exposure.mode='swap'"),
        ("pretrain.exposure.window", (0.5, 0.2), "pretrain.exposure.window"),
        ("posttrain.replay", 1.0, "posttrain.replay=1.0"),
        ("posttrain.compute_matched", "yes", "posttrain.compute_matched='yes'"),
        ("pretrain.batch", 0, "pretrain.batch=0"),
        ("finetune.tokens", -1, "finetune.tokens=-1"),
        ("data.post_pool_tokens", 5, "data.post_pool_tokens=5"),
    ],
)
def test_validate_names_key_and_value(key, value, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")):
        graph.check_sources(config.parse(raw(**{key: value}), 8))


def test_validate_window_too_small_and_replace_too_big():
    with pytest.raises(ValueError, match="pretrain.exposure.window"):
        config.parse(
            raw(**{"pretrain.exposure.lam": 1.0, "pretrain.exposure.window": (0.9, 1.0)}), 8
        )
    with pytest.raises(ValueError, match="replace"):
        config.parse(
            raw(
                **{
                    "pretrain.exposure.lam": 1.0,
                    "pretrain.exposure.mode": "replace",
                    "pretrain.tokens": 100 * S,
                }
            ),
            8,
        )
    with pytest.raises(ValueError, match="stage='eval'"):
        data.plan("eval", cfg())
