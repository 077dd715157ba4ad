"""Prepare → plan → loader on the built-in domains: exact, deterministic, resumable."""

import os

import jax
import ml_collections as mlc
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import base
from retention_jax import config, data
from retention_jax.data import builtin, packing, prep, sources, store

S = 32


def cfg(cache, **kw):
    c = base.get_config()
    c.data.seq_len = S
    c.data.val_tokens = 8 * S
    c.data.cache_dir = str(cache)
    c.data.post_pool_tokens = 64 * S
    c.data.ft_pool_tokens = 48 * S
    c.pretrain.tokens = 192 * S
    c.pretrain.batch = 8
    c.posttrain.batch = 8
    c.posttrain.max_tokens = 8 * S * 20
    c.finetune.tokens = 100 * S
    c.finetune.batch = 8
    c = mlc.ConfigDict(c.to_dict(), type_safe=False)
    for k, v in kw.items():
        config.assign(c, k, v)
    return config.parse(c, jax.device_count())


MODES = {
    "add": ("pretrain", {"pretrain.exposure.lam": 0.5}),
    "replace": ("pretrain", {"pretrain.exposure.lam": 0.25, "pretrain.exposure.mode": "replace"}),
    "window": ("pretrain", {"pretrain.exposure.lam": 0.5, "pretrain.exposure.window": (0.5, 1.0)}),
    "replay": ("posttrain", {"posttrain.replay": 0.05}),
    "compute_matched": (
        "posttrain",
        {"pretrain.exposure.lam": 0.25, "posttrain.compute_matched": True},
    ),
    "finetune": ("finetune", {}),
    "first_fit": ("pretrain", {"pretrain.exposure.lam": 0.5, "data.packing": "first_fit"}),
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data_cache")


def setup(cache, name, **extra):
    stage, kw = MODES[name]
    c = cfg(cache, **{**kw, **extra})
    plans = [data.plan(s, c) for s in ("pretrain", "posttrain", "finetune")]
    corpus = data.prepare(c.data, str(cache), data.needs_of(plans))
    return c, corpus, data.plan(stage, c)


def run(corpus, plan, c, **kw):
    return list(data.loader(corpus, plan, c.data.read_threads, **kw))


def same(a, b):
    return len(a) == len(b) and all(
        all(np.array_equal(x[k], y[k]) for k in x) and x.keys() == y.keys()
        for x, y in zip(a, b, strict=True)
    )


@pytest.mark.parametrize("name", list(MODES))
def test_deterministic_seeded_resumable(cache, name):
    c, corpus, plan = setup(cache, name)
    a = run(corpus, plan, c)
    assert len(a) == plan.num_steps > 4
    assert same(a, run(corpus, plan, c))  # same seed -> identical batches
    c1, corpus1, plan1 = setup(cache, name, seed=1)
    assert corpus1.fingerprint == corpus.fingerprint  # the seed orders, it does not change the data
    assert not same(a, run(corpus1, plan1, c1))  # different seed -> different order
    k = 3
    it = data.loader(corpus, plan, c.data.read_threads)
    for _ in range(k):
        next(it)
    state = it.get_state()
    it2 = data.loader(corpus, plan, c.data.read_threads)
    it2.set_state(state)
    assert same(list(it2), a[k:])  # resume after k batches -> identical continuation
    b = a[-1]
    assert (
        b["inputs"].dtype == np.int32 and b["inputs"].shape == (8, S) and b["domain"].shape == (8,)
    )


@pytest.mark.parametrize("name", list(MODES))
def test_stage_token_totals(cache, name):
    c, corpus, plan = setup(cache, name)
    tot = sum(data.tokens_by_domain(b) for b in run(corpus, plan, c))
    planned = np.array([plan.tokens[d] for d in data.DOMAINS])
    if plan.packing == "concat":
        assert tot.tolist() == planned.tolist()
    else:  # first-fit rows hold at most seq_len targets
        assert (tot <= planned).all() and (tot >= 0.8 * planned).all()


def test_batches_match_plan_and_processes(cache):
    c, corpus, plan = setup(cache, "add")
    batches = run(corpus, plan, c)
    dom, seq = plan.lookup(np.arange(8 * 5, 8 * 6))
    rows = store.DomainStore(corpus.stores["pre"].path, 8).rows("train", seq[dom == 0])
    assert np.array_equal(batches[5]["inputs"][dom == 0], rows["inputs"])
    assert np.array_equal(batches[5]["targets"][:, :-1], batches[5]["inputs"][:, 1:])
    halves = [run(corpus, plan, c, process_index=i, process_count=2) for i in range(2)]
    for k in (0, 7, len(batches) - 1):
        for key in batches[k]:
            assert np.array_equal(
                np.concatenate([halves[0][k][key], halves[1][k][key]]), batches[k][key]
            )
    with pytest.raises(ValueError, match="pretrain.batch=8"):
        data.loader(corpus, plan, c.data.read_threads, process_count=3)


def test_prepare_cached_and_extended_in_place(cache, monkeypatch):
    c, corpus, _ = setup(cache, "add")
    m = corpus.manifests()["post"]
    assert m["train"]["sequences"] >= 64 and m["val"]["sequences"] >= 8
    assert m["tokenizer_fingerprint"] == "byte-v1" and len(m["source_fingerprint"]) == 16
    assert m["seed"] == 0 and m["source_blocks"] == sources.BUILTIN_BLOCKS
    small = corpus.stores["post"].rows("train", np.arange(64))

    def boom(*a, **k):
        raise AssertionError("tokenized a block of a store that holds enough")

    monkeypatch.setattr(prep._Job, "run", boom)
    again = data.prepare(c.data, str(cache), {"post": 10})  # smaller need: reuses the store
    assert again.fingerprint == corpus.fingerprint
    assert again.stores["post"].path == corpus.stores["post"].path
    monkeypatch.undo()
    n = m["train"]["sequences"] + 1
    bigger = data.prepare(c.data, str(cache), {"post": n})  # extends the same store
    assert bigger.fingerprint == corpus.fingerprint
    assert bigger.stores["post"].manifest["train"]["shards"] > m["train"]["shards"]
    big = bigger.stores["post"].rows("train", np.arange(64))
    assert all(np.array_equal(small[k], big[k]) for k in small)


def test_shards_are_the_split_documents_of_their_blocks(cache):
    c, corpus, _ = setup(cache, "add")
    src = sources.open_source(c.data.post, "data.post")
    tok, st = corpus.tokenizer, corpus.stores["post"]
    keys = {}
    for split in ("train", "val"):
        entry = st.entries[split][0]
        assert entry["source_block"] == prep.block_order(src, 0, "post", 0)
        docs = list(src.read(entry["source_block"]))
        val = store.is_val([k for k, _ in docs], c.data.val_fraction)
        mine = [(k, t) for (k, t), v in zip(docs, val, strict=True) if v == (split == "val")]
        keys[split] = {k for k, _ in mine}
        flat = np.concatenate([tok.encode(t) + [tok.eos_id] for _, t in mine])
        rows = (len(flat) - 1) // S
        shard = np.load(os.path.join(st.path, split, "00000000.npy"))
        assert entry["sequences"] == rows and entry["documents"] == len(mine)
        assert np.array_equal(shard, flat[: rows * S + 1])
    assert keys["val"] and not keys["val"] & keys["train"]
    assert 0.005 < len(keys["val"]) / (len(keys["val"]) + len(keys["train"])) < 0.05
    assert store.is_val(["prose:0:17"], 0.5).tolist() == store.is_val(["prose:0:17"], 0.5).tolist()


def test_validation_batches_fixed_and_padded(cache):
    c, corpus, _ = setup(cache, "add")
    vb = data.validation_batches(corpus, "post", 3)
    assert (
        len(vb) == 3
        and vb[-1]["segment_ids"][2].sum() == 0
        and vb[-1]["domain"].tolist() == [1, 1, -1]
    )
    assert sum(data.tokens_by_domain(b) for b in vb).tolist() == [0, 8 * S, 0]
    assert same(vb, data.validation_batches(corpus, "post", 3))
    assert set(vb[0].keys()) == {"inputs", "targets", "segment_ids", "positions", "domain"}


def test_first_fit_segments():
    rng = np.random.default_rng(0)
    docs = [np.full(int(n), 100 + j, np.int32) for j, n in enumerate(rng.integers(2, 80, 300))]
    docs = [
        np.concatenate([d[:-1] + np.arange(len(d) - 1) * 0, [1]]).astype(np.int32) for d in docs
    ]
    pk = packing.FirstFitPacker(16, open_rows=8)
    for d in docs:
        pk.add(d)
    pk.flush()
    rows = pk.take(pk.sequences())
    seg, pos, inp, tgt = rows["segment_ids"], rows["positions"], rows["inputs"], rows["targets"]
    assert int((seg > 0).sum()) == sum(len(d) - 1 for d in docs)  # every pair packed once
    for r in range(len(seg)):
        for s_id in range(1, seg[r].max() + 1):
            m = seg[r] == s_id
            idx = np.nonzero(m)[0]
            assert np.array_equal(idx, np.arange(idx[0], idx[0] + len(idx)))  # contiguous
            assert np.array_equal(pos[r][m], np.arange(len(idx)))  # positions restart
            assert len(set(inp[r][m].tolist())) == 1  # one document per segment
            assert set(tgt[r][m].tolist()) <= {inp[r][m][0], 1}
        assert (inp[r][seg[r] == 0] == 0).all() and (tgt[r][seg[r] == 0] == 0).all()
    assert (seg > 0).mean() > 0.9  # first-fit wastes little


def test_to_global_on_mesh(cache):
    c, corpus, plan = setup(cache, "add")
    b = next(data.loader(corpus, plan, c.data.read_threads))
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    g = data.to_global(b, mesh, P("data", None))
    assert set(g) == {"inputs", "targets", "segment_ids", "positions"}
    assert g["inputs"].shape == (8, S) and len(g["inputs"].sharding.device_set) == 8
    assert np.array_equal(np.asarray(g["targets"]), b["targets"])


def test_orbax_checkpoint_of_iterator(cache, tmp_path):
    import grain
    import orbax.checkpoint as ocp

    c, corpus, plan = setup(cache, "replay")
    ref = run(corpus, plan, c)
    it = data.loader(corpus, plan, c.data.read_threads)
    for _ in range(5):
        next(it)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    it2 = data.loader(corpus, plan, c.data.read_threads)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(it2)))
    assert same(list(it2), ref[5:])


def test_builtin_domains_distinct_and_deterministic():
    chars = {}
    for name in builtin.NAMES:
        o = builtin.check_options(name, {}, "k")
        docs = [builtin.document(name, i, o) for i in range(200)]
        assert docs == [builtin.document(name, i, o) for i in range(200)]
        chars[name] = set("".join(docs))
    assert "|" in chars["music"] and "->" not in "".join(chars["prose"]) and "0" in chars["chem"]
    assert not chars["prose"] & set("|:^0123456789")  # prose: letters and punctuation only
    o = builtin.check_options("music", {"overlap": 1.0}, "k")
    assert "% " in builtin.document("music", 0, o)  # overlap injects prose lines
