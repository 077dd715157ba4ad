"""Real loaders on local files laid out like the hub datasets, tokenizers, and bad inputs."""

import dataclasses
import gzip
import importlib.util
import json
import os
import shutil

import ml_collections as mlc
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from configs import base, corpora
from retention_jax import config, data
from retention_jax.data import sources

S = 32
C4_README = """---
configs:
- config_name: en
  data_files:
  - split: train
    path: en/c4-train.*.json.gz
  - split: validation
    path: en/c4-validation.*.json.gz
---
# C4 (fixture)
"""


def _c4(root):
    """allenai/c4 layout: en/c4-{split}.NNNNN-of-NNNNN.json.gz, fields text/timestamp/url."""
    os.makedirs(root / "en")
    (root / "README.md").write_text(C4_README)
    for split, shards in (("train", 2), ("validation", 1)):
        for s in range(shards):
            name = root / "en" / f"c4-{split}.{s:05d}-of-{shards:05d}.json.gz"
            with gzip.open(name, "wt") as f:
                for i in range(150):
                    rec = {
                        "text": f"{split} web page {s}-{i}: the quick brown fox " * 3,
                        "timestamp": "2019-04-25T12:57:54Z",
                        "url": f"https://example.com/{s}/{i}",
                    }
                    f.write(json.dumps(rec) + "\n")
    return root


def _musicpile(root):
    """m-a-p/MusicPile layout: data/train-NNNNN-of-NNNNN-HASH.parquet, columns text/src."""
    os.makedirs(root / "data")
    for s in range(2):
        texts = [f"X:{i}\nT:Tune {s} {i}\nM:4/4\nK:G\n|:GABc dedB|" * 2 for i in range(200)]
        pq.write_table(
            pa.table({"text": texts, "src": ["abc"] * len(texts)}),
            root / "data" / f"train-{s:05d}-of-00002-0a1b2c3d4e5f6a7b.parquet",
        )
    return root


def _flan(root):
    """A FLAN-style dataset: data/train-*.parquet with inputs/targets/task columns."""
    os.makedirs(root / "data")
    ins = [f"Translate to French: the cat number {i}" for i in range(300)]
    tgs = [f"le chat numero {i}" for i in range(300)]
    pq.write_table(
        pa.table({"inputs": ins, "targets": tgs, "task": ["translate"] * 300}),
        root / "data" / "train-00000-of-00001.parquet",
    )
    return root


CHEMPILE_README = """---
configs:
- config_name: LibreTexts_Chemistry-default
  data_files:
  - split: train
    path: LibreTexts_Chemistry-default/train-*.parquet
  - split: test
    path: LibreTexts_Chemistry-default/test-*.parquet
- config_name: wikibooks-default
  data_files:
  - split: train
    path: wikibooks-default/train-*.parquet
---
# ChemPile-Education (fixture)
"""


def _chempile(root):
    """jablonkagroup/chempile-education layout: one README config per sub-source, each
    CONFIG/{split}-NNNNN-of-NNNNN.parquet with a text column."""
    (root / "LibreTexts_Chemistry-default").mkdir(parents=True)
    (root / "wikibooks-default").mkdir()
    (root / "README.md").write_text(CHEMPILE_README)
    for cfg_name, split, n in (
        ("LibreTexts_Chemistry-default", "train", 120),
        ("LibreTexts_Chemistry-default", "test", 30),
        ("wikibooks-default", "train", 50),
    ):
        texts = [f"{cfg_name} {split} {i}: the molar mass of CH4 is 16.04 g/mol." for i in range(n)]
        pq.write_table(
            pa.table({"text": texts}), root / cfg_name / f"{split}-00000-of-00001.parquet"
        )
    return root


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    return {
        "c4": _c4(root / "c4"),
        "music": _musicpile(root / "MusicPile"),
        "flan": _flan(root / "flan"),
        "chem": _chempile(root / "chempile-education"),
    }


def cfg(tmp, tokenizer="byte", **kw):
    c = base.get_config()
    c.data.tokenizer = tokenizer
    c.data.seq_len = S
    c.data.val_tokens = 4 * S
    c.data.val_fraction = 0.1
    c.data.cache_dir = str(tmp / "cache")
    c.data.post_pool_tokens = 20 * S
    c.data.ft_pool_tokens = 20 * S
    c.pretrain.tokens = 40 * S
    c.posttrain.max_tokens = 16 * S * 4
    c.finetune.tokens = 20 * S
    c = mlc.ConfigDict(c.to_dict(), type_safe=False)
    for k, v in kw.items():
        config.assign(c, k, v)
    return config.parse(c, 8)


def hub_cfg(tmp, hub, tokenizer="byte", **kw):
    return cfg(
        tmp,
        tokenizer,
        **{
            "data.pre": dict(
                source=f"hf:{hub['c4']}", name="c4", text="text", options={"config": "en"}
            ),
            "data.post": dict(
                source=f"hf:{hub['music']}", name="musicpile", text="text", options={}
            ),
            "data.ft": dict(
                source=f"hf:{hub['flan']}", name="flan", text="{inputs}\n{targets}", options={}
            ),
            **kw,
        },
    )


def needs(c):
    return data.needs_of([data.plan(s, c) for s in ("pretrain", "posttrain", "finetune")])


def domain(source: str, name: str = "d", text: str = "text", **options) -> config.Domain:
    return config.Domain(source, name, text, options)


def test_hub_layouts_offline(tmp_path, hub):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    c = hub_cfg(tmp_path, hub, **{"pretrain.exposure.lam": 0.5})
    corpus = data.prepare(c.data, str(tmp_path), needs(c))
    m = corpus.manifests()
    assert m["pre"]["train"]["sequences"] >= 40 and m["post"]["train"]["sequences"] >= 20
    assert m["ft"]["val"]["sequences"] >= 4 and corpus.stores["ft"].num_sequences["val"] == 4
    first = sources.open_source(c.data.pre, "data.pre").documents()
    key, text = next(first)
    assert key == "en/c4-train.00000-of-00002.json.gz:0" and text.startswith("train web page 0-0")
    ft = corpus.tokenizer.decode(corpus.stores["ft"].rows("train", np.arange(2))["inputs"].ravel())
    assert "Translate to French: the cat number" in ft and "\nle chat numero" in ft
    tot = sum(data.tokens_by_domain(b) for b in data.loader(corpus, data.plan("pretrain", c), 0))
    assert tot.tolist() == [40 * S, 10 * S, 0]
    val = sources.open_source(
        dataclasses.replace(c.data.pre, options={"config": "en", "split": "validation"}),
        "data.pre",
    )
    assert next(val.documents())[1].startswith("validation web page")


def test_smollm2_tokenizer(tmp_path, hub, tokenizer_dir):
    tok = data.make_tokenizer(f"hf:{tokenizer_dir}")
    assert tok.encode("Hello world") == [19556, 905]
    assert tok.eos_id == 0 and tok.pad_id == 0 and tok.vocab_size == 49152
    assert tok.decode([19556, 905]) == "Hello world"
    c = hub_cfg(tmp_path, hub, tokenizer=f"hf:{tokenizer_dir}")
    corpus = data.prepare(c.data, str(tmp_path), needs(c))
    assert (
        corpus.vocab_size == 49152
        and np.load(os.path.join(corpus.stores["pre"].path, "train", "00000000.npy")).dtype
        == np.uint16
    )
    b = next(data.loader(corpus, data.plan("finetune", c), 0))
    assert b["inputs"].max() < 49152 and (b["inputs"] == 0).any()  # EOS (id 0) ends documents


def test_sentencepiece_tokenizer(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(f"the river {i} runs past the old mill" for i in range(300)))
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(tmp_path / "m"), vocab_size=60, minloglevel=2
    )
    tok = data.make_tokenizer(f"spm:{tmp_path / 'm.model'}")
    ids = tok.encode("the river runs")
    assert tok.decode(ids) == "the river runs" and tok.eos_id == 2 and tok.vocab_size == 60


def test_datasets_streaming_path(tmp_path, hub):
    pytest.importorskip("datasets")
    src = sources.open_source(
        domain(f"hf:{hub['c4']}", "c4", config="en", use_datasets=True),
        "data.pre",
    )
    docs = src.documents()
    assert next(docs)[1].startswith("train web page") and sum(1 for _ in docs) == 299


def test_local_files_glob(tmp_path):
    d = tmp_path / "files"
    os.makedirs(d)
    for i in range(3):
        (d / f"doc{i}.txt").write_text(f"document number {i} " * 20)
    with open(d / "more.jsonl", "w") as f:
        for i in range(5):
            f.write(json.dumps({"body": f"json doc {i}"}) + "\n")
    src = sources.open_source(domain(f"files:{d}/*.txt", "t", "text"), "data.pre")
    assert [k for k, _ in src.documents()] == ["doc0.txt:0", "doc1.txt:0", "doc2.txt:0"]
    src = sources.open_source(domain(f"files:{d}/*.jsonl", "j", "body"), "data.pre")
    assert [t for _, t in src.documents()][4] == "json doc 4"


def test_seqio_source():
    if importlib.util.find_spec("seqio") is None:
        pytest.skip(
            "seqio is not installed in this environment (it needs TensorFlow; pip install .[seqio])"
        )
    import seqio
    import tensorflow as tf

    name = "retention_jax_test_task"
    if name not in seqio.TaskRegistry.names():
        seqio.TaskRegistry.add(
            name,
            source=seqio.FunctionDataSource(
                lambda split, shuffle_files: tf.data.Dataset.from_tensor_slices(
                    {"text": [f"doc {i}" for i in range(10)]}
                ),
                splits=["train"],
            ),
            output_features={},
        )
    src = sources.open_source(domain(f"seqio:{name}", "s", "text"), "data.pre")
    assert [t for _, t in src.documents()][:2] == ["doc 0", "doc 1"]


def test_tfds_source_needs_extra():
    if importlib.util.find_spec("tensorflow_datasets") is not None:
        pytest.skip("tensorflow_datasets installed; the error path is not reachable")
    with pytest.raises(ValueError, match="data.pre.source='tfds:c4/en:train'"):
        sources.open_source(domain("tfds:c4/en:train", "c4", "text"), "data.pre")


def test_bad_inputs_name_key_and_value(tmp_path, hub):
    with pytest.raises(ValueError, match="data.pre.source='gcs:bucket'"):
        data.prepare(cfg(tmp_path, **{"data.pre.source": "gcs:bucket"}).data, str(tmp_path), {})
    with pytest.raises(
        ValueError, match=r"data.post.source='files:/nonexistent/\*.txt': no files match"
    ):
        data.prepare(
            cfg(tmp_path, **{"data.post.source": "files:/nonexistent/*.txt"}).data,
            str(tmp_path),
            {},
        )
    with pytest.raises(
        ValueError, match=r"data.ft.text='\{inputs\}\\n\{answer\}': field 'answer' missing"
    ):
        c = hub_cfg(tmp_path, hub, **{"data.ft.text": "{inputs}\n{answer}"})
        data.prepare(c.data, str(tmp_path), {})
    with pytest.raises(ValueError, match="data.pre.options.config='fr': not in"):
        data.prepare(
            hub_cfg(tmp_path, hub, **{"data.pre.options": {"config": "fr"}}).data, str(tmp_path), {}
        )
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(
        ValueError, match="data.post.source='files:.*empty.jsonl': the source is empty"
    ):
        data.prepare(
            cfg(tmp_path, **{"data.post.source": f"files:{empty}"}).data, str(tmp_path), {}
        )
    with pytest.raises(
        ValueError, match="data.post.source=.*holds .* train .* the plans need 1000 train"
    ):
        data.prepare(hub_cfg(tmp_path, hub).data, str(tmp_path), {"post": 1000})
    with pytest.raises(ValueError, match="data.tokenizer='hf:/no/such/dir'"):
        data.make_tokenizer("hf:/no/such/dir")
    with pytest.raises(ValueError, match="data.tokenizer='spm:/no/such.model'"):
        data.make_tokenizer("spm:/no/such.model")
    with pytest.raises(ValueError, match="data.tokenizer='bpe'"):
        data.make_tokenizer("bpe")
    with pytest.raises(ValueError, match="data.pre.source='hf:./missing_dir'"):
        sources.open_source(domain("hf:./missing_dir", "x", "text"), "data.pre")


def test_chempile_config_offline(hub):
    chem = domain(f"hf:{hub['chem']}", "chempile", config="LibreTexts_Chemistry-default")
    docs = list(sources.open_source(chem, "data.ft").documents())
    assert len(docs) == 120 and docs[0][1].startswith("LibreTexts_Chemistry-default train 0:")
    assert docs[0][0] == "LibreTexts_Chemistry-default/train-00000-of-00001.parquet:0"
    test = dataclasses.replace(chem, options={**chem.options, "split": "test"})
    assert len(list(sources.open_source(test, "data.ft").documents())) == 30


def test_chempile_as_configured_reads_every_config(hub):
    options = corpora.REAL["chempile"]["options"]
    assert options == {"config": "*"}
    every = domain(f"hf:{hub['chem']}", "chempile", **options)
    keys = [k for k, _ in sources.open_source(every, "data.ft").documents()]
    assert len(keys) == 120 + 50 and len(set(keys)) == len(keys)
    assert {k.split("/")[0] for k in keys} == {"LibreTexts_Chemistry-default", "wikibooks-default"}
    both = domain(
        f"hf:{hub['chem']}",
        "chempile",
        config=["wikibooks-default", "LibreTexts_Chemistry-default"],
    )
    assert [k for k, _ in sources.open_source(both, "data.ft").documents()] == keys
    with pytest.raises(ValueError, match=r"split='test': not in config 'wikibooks-default'"):
        sources.open_source(domain(f"hf:{hub['chem']}", config="*", split="test"), "data.ft")
    with pytest.raises(ValueError, match=r"config=\['nope'\]: not in .*allowed: \['Libre"):
        sources.open_source(domain(f"hf:{hub['chem']}", config=["nope"]), "data.ft")


def test_preparation_refuses_an_ambiguous_multi_config_dataset(tmp_path, hub):
    unset = dict(source=f"hf:{hub['chem']}", name="chempile", text="text", options={})
    choices = r"\['LibreTexts_Chemistry-default', 'wikibooks-default'\]"
    with pytest.raises(
        ValueError,
        match=r"data.ft.options.config=None: .* has 2 configs and no default, so the choice "
        rf"is ambiguous; set one, a list, or '\*' for all: {choices}",
    ):
        data.prepare(hub_cfg(tmp_path, hub, **{"data.ft": unset}).data, str(tmp_path), {})
    with pytest.raises(ValueError, match=r"config='': .* has 2 configs and no default"):
        sources.open_source(domain(f"hf:{hub['chem']}", config=""), "data.ft")
    # A README that marks a default config names the choice itself.
    marked = tmp_path / "marked"
    shutil.copytree(hub["chem"], marked)
    readme = CHEMPILE_README.replace(
        "- config_name: wikibooks-default\n", "- config_name: wikibooks-default\n  default: true\n"
    )
    (marked / "README.md").write_text(readme)
    docs = list(sources.open_source(domain(f"hf:{marked}"), "data.ft").documents())
    assert len(docs) == 50 and docs[0][0].startswith("wikibooks-default/")


def _jsonl(path, bad: bytes, at: int = 200, n: int = 401) -> None:
    lines = [json.dumps({"text": f"document {i}: " + "la " * 40}).encode() for i in range(n)]
    lines[at] = bad
    path.write_bytes(b"\n".join(lines) + b"\n")


@pytest.mark.parametrize(
    "bad, what",
    [
        (b'{"text": "a\x01 control character"}', "JSONDecodeError: Invalid control character"),
        (b'{"text": "caf\xe9"}', "UnicodeDecodeError"),
        (b'{"body": "no text field"}', "field 'text' missing"),
    ],
)
def test_a_bad_document_is_named_and_fails_only_the_nodes_that_read_it(tmp_path, bad, what):
    from configs import default
    from retention_jax import errors, experiment

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    _jsonl(corpus / "music.jsonl", bad)
    c = default.get_config("smoke")
    c.data.post.source = f"files:{corpus}/*.jsonl"
    workdir = tmp_path / "w"
    with pytest.raises(experiment.GraphFailed) as e:
        experiment.run(c, str(workdir))
    failures = e.value.failures
    assert len(failures) == 21  # 3 pretraining nodes fail, their 18 descendants are skipped
    first = next(v for v in failures.values() if "skipped" not in v)
    assert first.startswith("DataError: data.post.")
    raw = (corpus / "music.jsonl").read_bytes().split(b"\n")
    offset = sum(len(line) + 1 for line in raw[:200])
    assert f"music.jsonl, the line at byte {offset}" in first  # the 201st line
    assert what in first
    assert issubclass(errors.DataError, errors.UserError)
    stores = os.listdir(workdir / "data_cache")
    assert [s[: s.index("-")] for s in stores] == ["pre"]  # no orphan D_post store
