"""The prepare step and its stores: parallel, resumable, seeded pools, integrity checks."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import ml_collections as mlc
import numpy as np
import pytest
from etils import epath

from configs import base
from retention_jax import config, data
from retention_jax.data import prep, sources, store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "..", "shared", "data", "smollm2-tokenizer")
S = 64


def exp(cache, **kw) -> config.Experiment:
    c = base.get_config()
    c.data.seq_len = S
    c.data.val_tokens = 4 * S
    c.data.cache_dir = str(cache)
    c.data.post_pool_tokens = 64 * S
    c.data.ft_pool_tokens = 48 * S
    c = mlc.ConfigDict(c.to_dict(), type_safe=False)
    for k, v in kw.items():
        config.assign(c, k, v)
    return config.parse(c, jax.device_count())


def entries(path: str) -> dict:
    return {sp: store.committed(path, sp) for sp in store.SPLITS}


def write_corpus(d, files: int, docs: int, words: int = 60) -> str:
    """`files` .jsonl files of `docs` documents each (one block per file)."""
    os.makedirs(d, exist_ok=True)
    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(5000)]
    for f in range(files):
        with open(os.path.join(d, f"part-{f:03d}.jsonl"), "w") as out:
            for i in range(docs):
                text = " ".join(rng.choice(vocab, words))
                out.write(json.dumps({"text": f"file {f} doc {i} {text}"}) + "\n")
    return f"files:{d}/*.jsonl"


def test_one_and_two_workers_give_the_same_store(tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "POOL_START_S", 0.0)  # start the workers after one block
    stores = {}
    for w in (1, 2):
        e = exp(tmp_path / f"w{w}", **{"data.workers": w})
        corpus = data.prepare(e.data, str(tmp_path), {"pre": 8000, "post": 600, "ft": 0})
        stores[w] = corpus.stores
    for d in data.DOMAINS:
        a, b = (entries(stores[w][d].path) for w in (1, 2))
        assert a == b and len(a["train"]) >= (2 if d != "ft" else 0)
    assert len(entries(stores[2]["pre"].path)["train"]) >= 4  # several blocks, in parallel


def test_validation_only_store_packs_no_training_documents(tmp_path):
    corpus = data.prepare(exp(tmp_path).data, str(tmp_path), {"pre": 10, "post": 10})
    ft = corpus.stores["ft"]
    assert ft.entries["train"] == [] and ft.num_sequences == {"train": 0, "val": 4}
    assert sum(e["sequences"] for e in ft.entries["val"]) >= 4


def test_pools_are_seeded_samples_of_blocks_disjoint_from_validation(tmp_path):
    src = write_corpus(tmp_path / "src", files=12, docs=40)
    rows, keys = {}, {}
    for seed in (0, 1, 0):
        e = exp(tmp_path / f"c{seed}", **{"data.post.source": src, "data.seed": seed})
        corpus = data.prepare(e.data, str(tmp_path), {"post": 600})
        st = corpus.stores["post"]
        pool = st.rows("train", np.arange(600))["inputs"]
        if seed in rows:
            assert np.array_equal(rows[seed], pool)  # the same seed: the same pool
        rows[seed] = pool
        blocks = [en["source_block"] for en in st.entries["train"]]
        assert st.manifest["seed"] == seed and "permute" in st.manifest["sampling"]
        s = sources.open_source(e.data.post, "data.post")
        docs = [kv for b in blocks for kv in s.read(b)]
        val = store.is_val([k for k, _ in docs], e.data.val_fraction)
        keys[seed] = {k for (k, _), v in zip(docs, val, strict=True) if not v}
        val_keys = {
            k
            for en in st.entries["val"]
            for k, _ in s.read(en["source_block"])
            if store.is_val([k], e.data.val_fraction)[0]
        }
        assert val_keys and not keys[seed] & val_keys  # no pool document is in validation
    assert not np.array_equal(rows[0], rows[1]) and keys[0] != keys[1]
    assert len(blocks) >= 3 and blocks != list(range(len(blocks)))  # not the stream prefix


def test_damaged_shards_are_named(tmp_path):
    e = exp(tmp_path)
    corpus = data.prepare(e.data, str(tmp_path), {"pre": 2000})
    path = corpus.stores["pre"].path
    shard = os.path.join(path, "train", "00000001.npy")
    with open(shard, "r+b") as f:  # same size, one byte changed
        f.seek(200)
        b = f.read(1)
        f.seek(200)
        f.write(bytes([b[0] ^ 1]))
    opened = store.DomainStore(path, 4)
    first = corpus.stores["pre"].entries["train"][0]["sequences"]
    opened.rows("train", np.arange(2))  # shard 0 is intact
    with pytest.raises(store.StoreError, match=f"store shard {shard} is damaged"):
        opened.rows("train", np.asarray([first]))
    with pytest.raises(store.StoreError, match="00000001.npy is damaged"):
        data.prepare(e.data, str(tmp_path), {"pre": 10**6})  # extends: checks what it reuses
    with pytest.raises(store.StoreError, match="00000001.npy is damaged"):
        data.prepare(e.data, str(tmp_path), {"pre": 2000}, verify=True)
    with open(shard, "r+b") as f:
        f.truncate(100)
    with pytest.raises(store.StoreError, match=r"00000001.npy is damaged or missing \(100 bytes"):
        store.DomainStore(path, 4)


def test_files_fingerprint_is_the_full_content(tmp_path):
    d = tmp_path / "src"
    src = write_corpus(d, files=2, docs=5)
    dom = config.Domain(src, "d", "text", {})
    before = sources.open_source(dom, "data.pre").fingerprint
    p = d / "part-001.jsonl"
    text = p.read_text()
    p.write_text(text[:-20] + text[-20:].replace("w", "x"))  # same size, other bytes
    assert len(p.read_text()) == len(text)
    assert sources.open_source(dom, "data.pre").fingerprint != before


def test_a_training_run_opens_stores_read_only(tmp_path):
    e = exp(tmp_path)
    missing = r"data.pre: store .* holds 0 train .*--only=prepare"
    with pytest.raises(store.StoreError, match=missing):
        data.prepare(e.data, str(tmp_path), {"pre": 100}, build=False)
    data.prepare(e.data, str(tmp_path), {"pre": 100})
    assert data.prepare(e.data, str(tmp_path), {"pre": 100}, build=False).stores["pre"]


def test_stale_temporary_directories_are_removed(tmp_path):
    e = exp(tmp_path)
    corpus = data.prepare(e.data, str(tmp_path), {"pre": 10})
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = corpus.stores["pre"].path
    stale = os.path.join(path, f".tmp-{socket.gethostname()}-{dead.pid}-abc")
    live = os.path.join(path, f".tmp-{socket.gethostname()}-{os.getpid()}-abc")
    os.makedirs(stale)
    os.makedirs(live)
    data.prepare(e.data, str(tmp_path), {"pre": 10})
    assert not os.path.exists(stale) and os.path.exists(live)


def test_remote_shards_read_by_byte_range(tmp_path):
    for a in (np.arange(1000, dtype=np.uint16), np.arange(60, dtype=np.int32).reshape(5, 4, 3)):
        np.save(tmp_path / "a.npy", a)
        r = store._RemoteArray(epath.Path(tmp_path / "a.npy"))
        assert np.array_equal(r[3:7], a[3:7]) and np.array_equal(r[2], a[2])


def test_resume_on_another_process_count_gives_the_same_global_batches(tmp_path):
    e = exp(tmp_path, **{"pretrain.tokens": 96 * S, "pretrain.batch": 8})
    plan = data.plan("pretrain", e)
    corpus = data.prepare(e.data, str(tmp_path), data.needs_of([plan]))
    one = data.loader(corpus, plan, 2)
    ref = [next(one) for _ in range(plan.num_steps)]
    one = data.loader(corpus, plan, 2)
    for _ in range(5):
        next(one)
    state = one.get_state()  # saved by a 1-process run ...
    halves = []
    for p in range(2):  # ... restored by 2 processes, each reading its rows
        it = data.loader(corpus, plan, 2, process_index=p, process_count=2)
        it.set_state(state)
        halves.append(list(it))
    assert len(halves[0]) == plan.num_steps - 5
    for k, (a, b) in enumerate(zip(*halves, strict=True)):
        for key in ref[5 + k]:
            assert np.array_equal(np.concatenate([a[key], b[key]]), ref[5 + k][key])


_PREPARE = """
import sys
sys.path.insert(0, {root!r})
from tests.test_data_store import exp
from retention_jax import data
from retention_jax.data import prep
prep.POOL_START_S = 0.0  # the workers start after the first block, however fast it was
e = exp({cache!r}, **{kw!r})
data.prepare(e.data, {cache!r}, {{"pre": 0, "post": {need}, "ft": 0}})
print("done")
"""


def _children(pid: int) -> list[int]:
    """Child processes of `pid` (Linux /proc)."""
    out = []
    for t in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{t}/children") as f:
            out += [int(c) for c in f.read().split()]
    return out


@pytest.mark.slow
def test_killed_prepare_resumes_to_the_uninterrupted_store(tmp_path):
    """SIGKILL mid-prepare (SmolLM2 tokenizer, 2 workers), rerun: the same store."""
    src = write_corpus(tmp_path / "src", files=16, docs=400)
    kw = {"data.post.source": src, "data.tokenizer": f"hf:{TOKENIZER}", "data.workers": 2}
    need = 20_000  # rows of ~11 of its 16 blocks (~1,800 rows each)
    stores = {}
    for name in ("killed", "clean"):
        cache = str(tmp_path / name)
        code = _PREPARE.format(root=ROOT, cache=cache, kw=kw, need=need)
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE)
        if name == "killed":
            deadline = time.monotonic() + 300
            train = None
            while time.monotonic() < deadline:
                found = [p for p in epath.Path(cache).glob("post-*") if p.is_dir()]
                train = str(found[0]) if found else None
                if train and len(store.committed(train, "train")) >= 3:
                    break
                time.sleep(0.05)
            workers = _children(proc.pid)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            assert train and 3 <= len(store.committed(train, "train")) < 16
            assert len(workers) >= 2  # the workers (and multiprocessing's resource tracker)
            deadline = time.monotonic() + 10  # the orphaned workers end with their parent
            while any(os.path.exists(f"/proc/{w}") for w in workers):
                assert time.monotonic() < deadline, f"workers {workers} outlived the prepare"
                time.sleep(0.1)
            assert [p for p in os.listdir(train) if p.startswith(".tmp-")]  # left by the kill
            proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE)
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0 and b"done" in out
        stores[name] = next(p for p in epath.Path(cache).glob("post-*") if p.is_dir())
    a, b = (entries(str(p)) for p in stores.values())
    assert a == b and 10 <= len(a["train"]) < 16
    assert stores["killed"].name == stores["clean"].name
    assert not [p for p in os.listdir(stores["killed"]) if p.startswith(".tmp-")]
    shutil.rmtree(tmp_path / "src")


def test_every_source_opens_before_any_is_tokenized(tmp_path):
    e = exp(tmp_path / "c", **{"data.ft.source": "files:/nonexistent/*.jsonl"})
    with pytest.raises(ValueError, match="data.ft.source='files:/nonexistent/"):
        data.prepare(e.data, str(tmp_path), {"pre": 100, "post": 100})
    assert not (tmp_path / "c").exists()  # D_pre and D_post were not tokenized


def test_the_index_caches_entries_and_yields_to_them(tmp_path):
    corpus = data.prepare(exp(tmp_path).data, str(tmp_path), {"pre": 2000})
    path = corpus.stores["pre"].path
    es = entries(path)["train"]
    index = json.loads((epath.Path(path) / "train" / store.INDEX).read_text())
    assert len(es) >= 2 and index == es
    os.remove(os.path.join(path, "train", "00000001.json"))  # shard 1 no longer committed
    assert store.committed(path, "train") == es[:1]


def test_the_prepare_step_fills_every_store_the_graph_reads(tmp_path, capsys):
    from configs import default
    from retention_jax import experiment, graph

    c = default.get_config("smoke")
    assert experiment.run(c, str(tmp_path), only=graph.PREPARE) == []
    out = capsys.readouterr().out
    nodes = experiment.expand(c)
    needs = data.needs_of([data.plan(n.stage, n.exp) for n in nodes])
    for d in data.DOMAINS:
        n = int(
            re.search(rf"data.{d}: .*: ([\d,]+) train sequences", out).group(1).replace(",", "")
        )
        assert n >= needs[d] > 0
    assert not (tmp_path / "runs").exists()  # nothing trained, nothing compiled
    corpus = data.prepare(nodes[0].exp.data, str(tmp_path), needs, build=False)
    assert corpus.fingerprint == data.prepare(nodes[0].exp.data, str(tmp_path), needs).fingerprint
