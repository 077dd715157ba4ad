"""Document sources named by a scheme: each yields (key, text) pairs in a fixed order.

  builtin:NAME            a generator of builtin.py (unbounded)
  files:GLOB              local .txt (one document per file), .jsonl/.json[.gz] (one per
                          line) or .parquet (one per row) files, in sorted path order
  hf:HUB_ID_OR_DIR        a Hugging Face dataset; options config (e.g. "en"), split
                          (default "train"), revision. A local directory laid out like the
                          hub repo is read directly (README.md `configs:` data_files if
                          present, else files whose path names the split); a hub id is
                          streamed with `datasets` (never fully downloaded), as is a local
                          directory with option use_datasets=True.
  tfds:NAME[:SPLIT]       a built TFDS dataset in ArrayRecord format, read by random access
                          (tfds extra); option data_dir
  seqio:TASK_OR_MIXTURE   a registered seqio Task's examples after its preprocessors, or a
                          Mixture's tasks interleaved by their rates (seqio extra); option
                          split

`c.data.<domain>.text` is a field name ("text") or a format string over fields
("{inputs}\n{targets}"); a missing field is an error that names it. The key of a
document (file path and row, or generator index) decides its split (store.py).
"""

import functools
import glob
import gzip
import hashlib
import json
import os
import re
from collections.abc import Iterator

from retention_jax import config, fileio
from retention_jax.data import builtin

SCHEMES = ("builtin", "files", "hf", "tfds", "seqio")
_EXTS = (".txt", ".jsonl", ".json", ".jsonl.gz", ".json.gz", ".parquet")


def parse(source: str, key: str) -> tuple[str, str]:
    scheme, sep, arg = str(source).partition(":")
    if not sep or scheme not in SCHEMES or not arg:
        config.fail(
            key, source, "a source of the schemes " + " | ".join(f"{s}:..." for s in SCHEMES)
        )
    return scheme, arg


def _text_of(record: dict, text: str, key: str, where: str) -> str:
    def get(field):
        if field not in record:
            raise ValueError(
                f"{key}.text={text!r}: field {field!r} missing in {where}; fields: {sorted(record)}"
            )
        v = record[field]
        return v.decode("utf-8") if isinstance(v, bytes) else str(v)

    if "{" in text:
        return text.format_map({f: get(f) for f in re.findall(r"{(\w+)}", text)})
    return get(text)


def _file_fingerprint(paths: list[str], root: str) -> str:
    h = hashlib.blake2b(digest_size=8)
    for p in paths:
        h.update(os.path.relpath(p, root).encode())
        h.update(str(os.path.getsize(p)).encode())
        with open(p, "rb") as f:
            h.update(f.read(1 << 20))
    return h.hexdigest()


def _read_file(path: str) -> Iterator[dict]:
    if path.endswith(".txt"):
        with open(path, encoding="utf-8") as f:
            yield {"text": f.read()}
    elif path.endswith(".parquet"):
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        for batch in pf.iter_batches(batch_size=1024):
            yield from batch.to_pylist()
    else:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)


class Source:
    """Documents of one domain: `documents()` yields (key, text) in a fixed order."""

    def __init__(self, spec: str, fingerprint: str, docs):
        self.spec, self.fingerprint, self._docs = spec, fingerprint, docs

    def documents(self) -> Iterator[tuple[str, str]]:
        return self._docs()


def _from_files(paths: list[str], root: str, text: str, key: str, spec: str) -> Source:
    def docs():
        for p in paths:
            rel = os.path.relpath(p, root)
            for i, rec in enumerate(_read_file(p)):
                yield f"{rel}:{i}", _text_of(rec, text, key, rel)

    return Source(spec, _file_fingerprint(paths, root), docs)


def _hub_files(root: str, config: str | None, split: str, key: str) -> list[str]:
    """Files of (config, split) in a local directory laid out like a hub dataset repo."""
    readme = os.path.join(root, "README.md")
    if os.path.exists(readme):
        import yaml

        with open(readme, encoding="utf-8") as f:
            parts = f.read().split("---")
        meta = yaml.safe_load(parts[1]) if len(parts) > 2 else None
        configs = (meta or {}).get("configs") or []
        if configs:
            names = [c.get("config_name", "default") for c in configs]
            want = config or "default"
            if want not in names:
                raise ValueError(
                    f"{key}.options.config={config!r}: not in {root}; allowed: {names}"
                )
            files = configs[names.index(want)].get("data_files")
            if isinstance(files, str):
                files = [{"split": "train", "path": files}]
            splits = {d["split"]: d["path"] for d in files}
            if split not in splits:
                raise ValueError(
                    f"{key}.options.split={split!r}: not in config {want!r}; "
                    f"allowed: {sorted(splits)}"
                )
            pats = splits[split] if isinstance(splits[split], list) else [splits[split]]
            return sorted(
                p for pat in pats for p in glob.glob(os.path.join(root, pat), recursive=True)
            )
    base = os.path.join(root, config) if config else root
    if config and not os.path.isdir(base):
        raise ValueError(f"{key}.options.config={config!r}: no directory {base}")
    out = []
    for p in glob.glob(os.path.join(base, "**", "*"), recursive=True):
        rel = os.path.relpath(p, base)
        if p.endswith(_EXTS) and split in re.split(r"[^a-zA-Z]+", rel):
            out.append(p)
    return sorted(out)


def _hf_streamed(name: str, opts: dict, text: str, key: str, spec: str) -> Source:
    try:
        import datasets
    except ImportError as e:
        raise ValueError(
            f"{key}.source={spec!r}: reading a hub dataset needs `datasets` (pip install .[hf])"
        ) from e

    def docs():
        ds = datasets.load_dataset(
            name,
            opts.get("config"),
            split=opts.get("split", "train"),
            streaming=True,
            revision=opts.get("revision"),
        )
        for i, rec in enumerate(ds):
            yield f"{i}", _text_of(rec, text, key, name)

    fp = fileio.digest(
        [name, opts.get("config"), opts.get("split", "train"), opts.get("revision")], 8
    )
    return Source(spec, fp, docs)


def _tfds(arg: str, opts: dict, text: str, key: str, spec: str) -> Source:
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ValueError(
            f"{key}.source={spec!r}: needs tensorflow_datasets and array_record "
            "(pip install .[tfds])"
        ) from e
    name, _, split = arg.partition(":")
    split = split or "train"
    data_dir = opts.get("data_dir")
    try:
        src = tfds.data_source(name, split=split, data_dir=data_dir)
    except Exception as e:  # not built, unknown name or split, not ArrayRecord
        raise ValueError(
            f"{key}.source={spec!r}: no ArrayRecord TFDS data for {name!r} split {split!r} "
            f"(options.data_dir={data_dir!r}); build it with "
            f"download_and_prepare(file_format='array_record') ({type(e).__name__}: {e})"
        ) from e
    info = src.dataset_info

    def docs():
        for i in range(len(src)):
            yield f"{i}", _text_of(src[i], text, key, name)

    identity = ["tfds", info.full_name, split, len(src)]
    return Source(spec, fileio.digest(identity, 8), docs)


def _describe(fn) -> str:
    """A stable name for a preprocessor (no memory addresses): module.qualname(+kwargs)."""
    if isinstance(fn, functools.partial):
        args = json.dumps([list(map(repr, fn.args)), {k: repr(v) for k, v in fn.keywords.items()}])
        return f"{_describe(fn.func)}{args}"
    return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


def interleave(rates: list[float]) -> Iterator[int]:
    """Which of len(rates) streams supplies each next item, so that every prefix of n items
    holds each stream's share n * rate / sum(rates) to within one item (smooth weighted
    round robin; ties go to the earlier stream). Deterministic and unbounded."""
    total = float(sum(rates))
    credit = [0.0] * len(rates)
    while True:
        for i, r in enumerate(rates):
            credit[i] += r
        pick = max(range(len(rates)), key=lambda i: (credit[i], -i))
        credit[pick] -= total
        yield pick


def _seqio_records(task, split: str) -> Iterator[dict]:
    """A Task's examples after all its preprocessors, token fields decoded back to text
    with the task's own vocabulary (the project's tokenizer encodes them again)."""
    ds = task.get_dataset(sequence_length=None, split=split, shuffle=False, use_cached=False)
    for rec in ds.as_numpy_iterator():
        out = dict(rec)
        for field, feature in task.output_features.items():
            v = out.get(field)
            if v is not None and getattr(v, "dtype", None) is not None and v.dtype.kind in "iu":
                out[field] = feature.vocabulary.decode(v.tolist())
        yield out


def _seqio(name: str, opts: dict, text: str, key: str, spec: str) -> Source:
    """A seqio Task, or a Mixture whose tasks are interleaved by their rates.

    A Mixture's documents come in the order `interleave(rates)` gives, ending when its
    first task runs out, so every prefix has the mixture's composition. Prepared stores
    read a source in order until full (store.py), so the rates decide the document
    composition of the domain's store; the stage plans then mix domains, not tasks.
    """
    try:
        import seqio
    except ImportError as e:
        raise ValueError(f"{key}.source={spec!r}: needs seqio (pip install .[seqio])") from e
    split = opts.get("split", "train")
    try:
        provider = seqio.get_mixture_or_task(name)
    except ValueError as e:
        raise ValueError(
            f"{key}.source={spec!r}: no seqio Task or Mixture {name!r} is registered "
            "(import the module that registers it first)"
        ) from e
    if isinstance(provider, seqio.Mixture):
        tasks = list(provider.tasks)
        rates = [float(provider.get_rate(t)) for t in tasks]
    else:
        tasks, rates = [provider], [1.0]
    for t in tasks:
        if split not in t.splits:
            raise ValueError(
                f"{key}.options.split={split!r}: not a split of seqio task {t.name!r}; "
                f"allowed: {sorted(t.splits)}"
            )

    def docs():
        streams = [enumerate(_seqio_records(t, split)) for t in tasks]
        for pick in interleave(rates):
            item = next(streams[pick], None)
            if item is None:
                return
            i, rec = item
            yield f"{tasks[pick].name}:{i}", _text_of(rec, text, key, tasks[pick].name)

    identity = [
        "seqio",
        name,
        split,
        [[t.name, r, [_describe(p) for p in t.preprocessors]] for t, r in zip(tasks, rates)],
    ]
    return Source(spec, fileio.digest(identity, 8), docs)


def check(domain: "config.Domain", key: str) -> None:
    """What can be checked of a domain's source without opening it (config validation)."""
    scheme, arg = parse(domain.source, f"{key}.source")
    if scheme == "builtin":
        builtin.check_options(arg, dict(domain.options), f"{key}.options")


def open_source(domain: "config.Domain", key: str) -> Source:
    """The source of `c.data.<domain>` (`key` names it in errors). Checks that files exist."""
    spec = domain.source
    scheme, arg = parse(spec, f"{key}.source")
    opts = dict(domain.options)
    text = domain.text
    if scheme == "builtin":
        o = builtin.check_options(arg, opts, f"{key}.options")
        fp = fileio.digest([builtin.VERSION, arg, o], 8)

        def docs():
            i = 0
            while True:
                yield f"{arg}:{o['seed']}:{i}", builtin.document(arg, i, o)
                i += 1

        return Source(spec, fp, docs)
    if scheme == "files":
        paths = sorted(
            p for p in glob.glob(os.path.expanduser(arg), recursive=True) if os.path.isfile(p)
        )
        if not paths:
            raise ValueError(f"{key}.source={spec!r}: no files match {arg!r}")
        bad = [p for p in paths if not p.endswith(_EXTS)]
        if bad:
            raise ValueError(
                f"{key}.source={spec!r}: unsupported file {bad[0]!r}; allowed: {list(_EXTS)}"
            )
        return _from_files(
            paths, os.path.commonpath([os.path.dirname(p) for p in paths]), text, f"{key}", spec
        )
    if scheme == "hf":
        if os.path.isdir(arg) and not opts.get("use_datasets"):
            split = opts.get("split", "train")
            paths = _hub_files(arg, opts.get("config"), split, key)
            if not paths:
                raise ValueError(
                    f"{key}.source={spec!r}: no data files for split {split!r} in {arg}"
                )
            return _from_files(paths, arg, text, key, spec)
        if not os.path.isdir(arg) and (arg.startswith((".", "/", "~"))):
            raise ValueError(f"{key}.source={spec!r}: directory {arg!r} not found")
        return _hf_streamed(arg, opts, text, key, spec)
    if scheme == "tfds":
        return _tfds(arg, opts, text, key, spec)
    return _seqio(arg, opts, text, key, spec)
