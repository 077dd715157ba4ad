"""seqio Tasks and Mixtures and TFDS datasets as document sources, for real (TF extras):
preprocessors applied, mixture rates kept, both through data.prepare into a stage."""

import collections
import functools
import os

import numpy as np
import pytest

from configs import default
from retention_jax import config, experiment, stage
from retention_jax.data import sources, store

N_DOCS = 600


def music(i: int) -> str:
    return f"tune {i}: " + " ".join(f"{'CDEFGAB'[(i + j) % 7]}{j % 4 + 2}" for j in range(40))


def chem(i: int) -> str:
    return f"compound {i}: " + "-".join(f"C{(i * j) % 9 + 1}H{j % 5 + 2}" for j in range(24))


def test_interleave_keeps_rates_in_every_prefix():
    picks = list(zip(range(1000), sources.interleave([3.0, 1.0, 0.5]), strict=False))
    counts = np.zeros(3)
    for n, (_, pick) in enumerate(picks, start=1):
        counts[pick] += 1
        assert np.abs(counts - n * np.array([3.0, 1.0, 0.5]) / 4.5).max() <= 1.0
    assert counts.tolist() == [667.0, 222.0, 111.0]
    assert [p for _, p in picks[:9]] == [0, 1, 0, 0, 2, 0, 0, 1, 0]


@pytest.fixture(scope="module")
def seqio_tasks():
    """eco_music: rekey + an uppercasing preprocessor, text output; eco_chem: tokenized
    with seqio's byte vocabulary (and EOS); eco_mix: music 3 : chem 1."""
    seqio = pytest.importorskip("seqio")
    tf = pytest.importorskip("tensorflow")

    def source(make):
        def dataset_fn(split, shuffle_files, seed=None):
            del shuffle_files, seed
            n = N_DOCS if split == "train" else 10
            return tf.data.Dataset.from_tensor_slices({"body": [make(i) for i in range(n)]})

        return seqio.FunctionDataSource(dataset_fn, splits=["train", "validation"])

    def upper(ds):
        return ds.map(lambda x: {"text": tf.strings.upper(x["text"])})

    rekey = functools.partial(seqio.preprocessors.rekey, key_map={"text": "body"})
    text = seqio.Feature(seqio.PassThroughVocabulary(1), dtype=tf.string, add_eos=False, rank=0)
    seqio.TaskRegistry.add(
        "eco_music",
        source=source(music),
        preprocessors=[rekey, upper],
        output_features={"text": text},
    )
    seqio.TaskRegistry.add(
        "eco_chem",
        source=source(chem),
        preprocessors=[rekey, seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
        output_features={"text": seqio.Feature(seqio.ByteVocabulary(), add_eos=True)},
    )
    seqio.MixtureRegistry.add("eco_mix", [("eco_music", 3), ("eco_chem", 1)])
    yield
    seqio.MixtureRegistry.remove("eco_mix")
    seqio.TaskRegistry.remove("eco_music")
    seqio.TaskRegistry.remove("eco_chem")


def docs(source: str, text: str = "text", **options) -> list[tuple[str, str]]:
    domain = config.Domain(source, "d", text, options)
    return list(sources.open_source(domain, "data.post").documents())


def test_seqio_task_applies_preprocessors(seqio_tasks):
    got = docs("seqio:eco_music")
    assert len(got) == N_DOCS
    assert got[7] == ("eco_music:7", music(7).upper())
    assert docs("seqio:eco_music", split="validation")[2] == ("eco_music:2", music(2).upper())


def test_seqio_tokenized_task_is_decoded(seqio_tasks):
    got = docs("seqio:eco_chem")
    assert got[:2] == [("eco_chem:0", chem(0)), ("eco_chem:1", chem(1))]  # EOS dropped


def test_seqio_mixture_rates_decide_the_documents(seqio_tasks):
    got = docs("seqio:eco_mix")
    assert len(got) == N_DOCS + N_DOCS // 3  # ends when music (rate 3/4) runs out
    assert got[:5] == [  # seqio lists a mixture's tasks by name: chem (1), music (3)
        ("eco_music:0", music(0).upper()),
        ("eco_chem:0", chem(0)),
        ("eco_music:1", music(1).upper()),
        ("eco_music:2", music(2).upper()),
        ("eco_music:3", music(3).upper()),
    ]
    counts = collections.Counter(k.split(":")[0] for k, _ in got[:400])
    assert counts == {"eco_music": 300, "eco_chem": 100}


def test_seqio_errors_name_the_key(seqio_tasks):
    with pytest.raises(ValueError, match=r"data.post.source='seqio:no_such_task': no seqio"):
        docs("seqio:no_such_task")
    with pytest.raises(ValueError, match=r"data.post.options.split='test': .*'validation'"):
        docs("seqio:eco_mix", split="test")


def test_seqio_fingerprint_follows_the_preprocessors(seqio_tasks):
    seqio = pytest.importorskip("seqio")
    fp = sources.open_source(config.Domain("seqio:eco_mix", "m", "text", {}), "k").fingerprint
    assert (
        fp == sources.open_source(config.Domain("seqio:eco_mix", "m", "text", {}), "k").fingerprint
    )
    seqio.MixtureRegistry.add("eco_mix_even", [("eco_music", 1), ("eco_chem", 1)])
    try:
        assert (
            sources.open_source(
                config.Domain("seqio:eco_mix_even", "m", "text", {}), "k"
            ).fingerprint
            != fp
        )
    finally:
        seqio.MixtureRegistry.remove("eco_mix_even")


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory) -> str:
    """A TFDS dataset built locally in ArrayRecord format: title and body per example."""
    tfds = pytest.importorskip("tensorflow_datasets")
    pytest.importorskip("array_record")

    tf = pytest.importorskip("tensorflow")
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    examples = {
        "title": [f"entry {i}" for i in range(N_DOCS)],
        "body": [chem(i) for i in range(N_DOCS)],
    }
    builder = tfds.dataset_builders.TfDataBuilder(
        name="eco_chem",
        version="1.0.0",
        split_datasets={"train": tf.data.Dataset.from_tensor_slices(examples)},
        features=tfds.features.FeaturesDict(
            {"title": tfds.features.Text(), "body": tfds.features.Text()}
        ),
        data_dir=data_dir,
        file_format="array_record",
    )
    builder.download_and_prepare()
    return data_dir


def test_tfds_source(tfds_dir):
    """Read by random access in the built (shuffled) order; fields formatted per example."""
    got = docs("tfds:eco_chem:train", text="body", data_dir=tfds_dir)
    assert [k for k, _ in got] == [str(i) for i in range(N_DOCS)]
    assert sorted(t for _, t in got) == sorted(chem(i) for i in range(N_DOCS))
    titled = docs("tfds:eco_chem", text="{title}\n{body}", data_dir=tfds_dir)
    for (_, body), (_, both) in zip(got, titled, strict=True):
        n = int(both.split("\n")[0].removeprefix("entry "))
        assert both == f"entry {n}\n{body}" and body == chem(n)
    with pytest.raises(ValueError, match=r"data.post.source='tfds:eco_chem:test': no ArrayRecord"):
        docs("tfds:eco_chem:test", data_dir=tfds_dir)


def test_prepare_and_a_stage(seqio_tasks, tfds_dir, tmp_path):
    """Post-training data from the seqio mixture, fine-tuning data from TFDS: prepared
    into stores, then a pretraining stage with early exposure to the mixture."""
    cfg = default.get_config("smoke")
    cfg.data.val_fraction = 0.2
    cfg.data.val_tokens = 2_048
    cfg.data.post.update(source="seqio:eco_mix", name="mix")
    cfg.data.ft.update(
        source="tfds:eco_chem:train", name="chem", text="body", options={"data_dir": tfds_dir}
    )
    cfg.pretrain.tokens = 16_384
    cfg.sweep.pretrain = (("pretrain.exposure.lam", (1.0,)),)
    rows = experiment.run(cfg, str(tmp_path), only="pretrain")
    assert rows == []  # no leaf finished: only the pretraining node ran
    (node,) = [n for n in experiment.expand(cfg) if n.stage == "pretrain"]
    result = stage.read_result(os.path.join(tmp_path, "runs", node.id))
    # λ = 1 adds the whole |D_post| pool to the 16,384 pretraining tokens, in steps of 2,048
    steps = (cfg.pretrain.tokens + cfg.data.post_pool_tokens) // (16 * 128)
    assert result["steps"] == steps == 9 and result["tokens"] == result["planned_tokens"]
    assert result["tokens"]["post"] == cfg.data.post_pool_tokens
    assert all(np.isfinite(list(result["val"].values())))
    stores = {
        os.path.basename(p).split("-")[0]: store.DomainStore(p, 1)
        for p in (tmp_path / "data_cache").iterdir()
        if not p.name.startswith(".")
    }
    assert stores["post"].manifest["source"] == "seqio:eco_mix"
    assert stores["ft"].manifest["source"] == "tfds:eco_chem:train"
    tokens = np.load(os.path.join(stores["post"].path, "train", "00000000.npy"))[:4000]
    text = bytes((tokens[tokens >= 2] - 2).astype(np.uint8)).decode("utf-8", "replace")
    assert "TUNE 0:" in text or "TUNE 1:" in text  # preprocessed, in the mixture's order
    assert "compound " in text
