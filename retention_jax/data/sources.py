"""Document sources named by a scheme, read in blocks: the unit of parallel preparation.

  builtin:NAME            a generator of builtin.py (unbounded)
  files:GLOB              local .txt (one document per file), .jsonl/.json[.gz] (one per
                          line) or .parquet (one per row) files
  hf:HUB_ID_OR_DIR        a Hugging Face dataset; options config (e.g. "en"), split
                          (default "train"), revision. Its data files are read directly,
                          from a local directory laid out like the hub repo or from the
                          hub itself at the resolved commit (README.md `configs:`
                          data_files if present, else files whose path names the split).
                          config may also be a list of configs or "*" (all of them);
                          unset, a README with several configs and no default is refused.
                          Option use_datasets=True streams it with `datasets` instead.
  tfds:NAME[:SPLIT]       a built TFDS dataset in ArrayRecord format, read by random access
                          (tfds extra); option data_dir
  seqio:TASK_OR_MIXTURE   a registered seqio Task's examples after its preprocessors, or a
                          Mixture's tasks interleaved by their rates (seqio extra); option
                          split

A source is a list of blocks, each a few MiB of documents that one worker reads on its
own (`read(b)`): a run of up to 64 .txt files, a byte range of an uncompressed
.jsonl/.json file (lines that start in it), a whole compressed file, a parquet row
group, 256 generated documents, 1024 TFDS records. Blocks of `builtin`, `files`, `hf`
and `tfds` are random access (`num_blocks`); a `datasets` stream and seqio are
sequential (`num_blocks` None: `documents()` in order, blocks of 1024 consecutive
documents). The key of a document (file path and row or byte offset, or generator
index) does not depend on the blocking; it decides the document's split (store.py).

`c.data.<domain>.text` is a field name ("text") or a format string over fields
("{inputs}\n{targets}"); a missing field is an error that names it.

Fingerprints cover what decides the documents: the full content of local files, the
resolved hub commit (`revision`, recorded in the store manifest), the TFDS build, the
seqio task's preprocessors, the generator's version and options.
"""

import functools
import glob
import gzip
import hashlib
import json
import os
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING

from retention_jax import fileio
from retention_jax.data import builtin
from retention_jax.errors import DataError, fail

if TYPE_CHECKING:  # annotations only: config imports this module to check sources
    from retention_jax.config import Domain

SCHEMES = ("builtin", "files", "hf", "tfds", "seqio")
_EXTS = (".txt", ".jsonl", ".json", ".jsonl.gz", ".json.gz", ".parquet")
BLOCK_BYTES = 8 << 20  # byte range of an uncompressed json-lines file per block
TXT_PER_BLOCK = 64
BUILTIN_PER_BLOCK = 256
RECORDS_PER_BLOCK = 1024  # TFDS records, and documents of a sequential source
BUILTIN_BLOCKS = 1 << 32  # an unbounded generator, seen as this many blocks


def parse(source: str, key: str) -> tuple[str, str]:
    scheme, sep, arg = str(source).partition(":")
    if not sep or scheme not in SCHEMES or not arg:
        fail(key, source, "a source of the schemes " + " | ".join(f"{s}:..." for s in SCHEMES))
    return scheme, arg


def _json(line: bytes | str, key: str, spec: str, where: str) -> dict:
    """One JSON line; a malformed or non-UTF-8 one named by file and place (DataError)."""
    try:
        return json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(
            f"{key}.source={spec!r}: {where}: not a JSON line ({type(e).__name__}: {e}); "
            f"it begins {bytes(line[:60]) if isinstance(line, bytes) else line[:60]!r}"
        ) from None


def _utf8(raw: bytes, key: str, spec: str, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{key}.source={spec!r}: {where}, byte {e.start}: not UTF-8 text ({e.reason})"
        ) from None


def _text_of(record: dict, text: str, key: str, where: str) -> str:
    def get(field):
        if field not in record:
            raise DataError(
                f"{key}.text={text!r}: field {field!r} missing in {where}; fields: {sorted(record)}"
            )
        v = record[field]
        return v.decode("utf-8") if isinstance(v, bytes) else str(v)

    if "{" in text:
        return text.format_map({f: get(f) for f in re.findall(r"{(\w+)}", text)})
    return get(text)


class Source:
    """Documents of one domain, in blocks. `num_blocks` is None for a sequential source."""

    spec: str
    fingerprint: str
    num_blocks: int | None
    revision: str | None = None  # the hub commit read, where the source has one

    def read(self, block: int) -> Iterator[tuple[str, str]]:
        """(key, text) of one block, in order (random-access sources only)."""
        raise NotImplementedError

    def documents(self) -> Iterator[tuple[str, str]]:
        """Every (key, text), block by block."""
        for b in range(self.num_blocks):
            yield from self.read(b)


class BuiltinSource(Source):
    def __init__(self, spec: str, name: str, opts: dict):
        self.spec, self.name, self.opts = spec, name, opts
        self.fingerprint = fileio.digest([builtin.VERSION, name, opts], 8)
        self.num_blocks = BUILTIN_BLOCKS

    def read(self, block: int) -> Iterator[tuple[str, str]]:
        seed = self.opts["seed"]
        for i in range(block * BUILTIN_PER_BLOCK, (block + 1) * BUILTIN_PER_BLOCK):
            yield f"{self.name}:{seed}:{i}", builtin.document(self.name, i, self.opts)


def _local_fs():
    import fsspec

    return fsspec.filesystem("file")


def _hub_fs():
    from huggingface_hub import HfFileSystem

    return HfFileSystem()


class FileSource(Source):
    """Data files on a filesystem (local, or the hub's at a fixed commit), in blocks."""

    def __init__(self, spec, paths, root, text, key, revision=None):
        """`revision`: the hub commit `paths` are at (read through the hub's filesystem);
        None for local files."""
        self.spec, self.paths, self.root, self.text, self.key = spec, paths, root, text, key
        self.revision = revision
        self.fs = None if revision is None else _hub_fs()
        fs = self.fs or _local_fs()
        self.blocks = _file_blocks(paths, fs)  # (file index, kind, start, end)
        self.num_blocks = len(self.blocks)
        if revision is not None:  # a hub commit names the content; the files need no reading
            sizes = [fs.size(p) for p in paths]
            self.fingerprint = fileio.digest([revision, [self._rel(p) for p in paths], sizes], 8)
        else:
            self.fingerprint = _content_hash(paths, root, fs)

    def _rel(self, path: str) -> str:
        return os.path.relpath(path, self.root)

    def _open(self, path: str):
        return (self.fs or _local_fs()).open(path, "rb")

    def read(self, block: int) -> Iterator[tuple[str, str]]:
        i, kind, a, b = self.blocks[block]
        if kind == "txt":
            for p in self.paths[a:b]:
                with self._open(p) as f:
                    yield f"{self._rel(p)}:0", _utf8(f.read(), self.key, self.spec, self._rel(p))
            return
        path = self.paths[i]
        rel = self._rel(path)
        if kind == "rows":
            import pyarrow.parquet as pq

            with self._open(path) as f:
                pf = pq.ParquetFile(f)
                first = sum(pf.metadata.row_group(g).num_rows for g in range(a))
                rows = pf.read_row_group(a).to_pylist()
            for j, rec in enumerate(rows):
                yield f"{rel}:{first + j}", _text_of(rec, self.text, self.key, rel)
        elif kind == "whole":
            with self._open(path) as raw, gzip.open(raw, "rb") as f:
                for j, line in enumerate(f):
                    if line.strip():
                        where = f"{rel}, line {j + 1}"
                        rec = _json(line, self.key, self.spec, where)
                        yield f"{rel}:{j}", _text_of(rec, self.text, self.key, where)
        else:  # the lines that start in [a, b)
            with self._open(path) as f:
                f.seek(max(a - 1, 0))
                if a:
                    f.readline()  # the rest of the line that started before a (or just "\n")
                at = f.tell()
                while at < b:
                    line = f.readline()
                    if not line:
                        break
                    if line.strip():
                        where = f"{rel}, the line at byte {at}"
                        rec = _json(line, self.key, self.spec, where)
                        yield f"{rel}:b{at}", _text_of(rec, self.text, self.key, where)
                    at += len(line)


def _file_blocks(paths: list[str], fs) -> list[tuple[int, str, int, int]]:
    """(file index, kind, start, end) of each block: runs of up to TXT_PER_BLOCK .txt
    files, parquet row groups, whole compressed files, BLOCK_BYTES ranges of the rest."""
    blocks = []
    for i, p in enumerate(paths):
        if p.endswith(".txt"):
            if not blocks or blocks[-1][1] != "txt" or (i - blocks[-1][2] >= TXT_PER_BLOCK):
                blocks.append((i, "txt", i, i + 1))
            else:
                f0, _, a, _ = blocks[-1]
                blocks[-1] = (f0, "txt", a, i + 1)
        elif p.endswith(".parquet"):
            import pyarrow.parquet as pq

            with fs.open(p, "rb") as f:
                groups = pq.ParquetFile(f).metadata.num_row_groups
            blocks += [(i, "rows", g, g + 1) for g in range(groups)]
        elif p.endswith(".gz"):
            blocks.append((i, "whole", 0, 0))
        else:
            size = fs.size(p)
            blocks += [
                (i, "bytes", a, min(a + BLOCK_BYTES, size))
                for a in range(0, max(size, 1), BLOCK_BYTES)
            ]
    return blocks


def _content_hash(paths: list[str], root: str, fs) -> str:
    """blake2b over every byte of every file (and its path): a same-size edit shows."""
    h = hashlib.blake2b(digest_size=8)
    for p in paths:
        h.update(os.path.relpath(p, root).encode() + b"\0")
        with fs.open(p, "rb") as f:
            while chunk := f.read(8 << 20):
                h.update(chunk)
    return h.hexdigest()


class _Sequential(Source):
    num_blocks = None

    def __init__(self, spec: str, fingerprint: str, docs, revision: str | None = None):
        self.spec, self.fingerprint, self._docs, self.revision = spec, fingerprint, docs, revision

    def documents(self) -> Iterator[tuple[str, str]]:
        return self._docs()


def _hub_files(fs, root: str, config, split: str, key: str) -> list[str]:
    """Files of (config, split) in a directory laid out like a hub dataset repo.

    `config` names one of the README's configs, a list of them, or "*" for all. Left unset,
    it may stand only for an unambiguous choice: the single config, or the one the README
    marks as the default. A dataset of several configs without a default is refused, since
    its configs are usually different sub-corpora and picking one would pick the data.
    """
    readme = f"{root}/README.md"
    if fs.exists(readme):
        import yaml

        with fs.open(readme, "rb") as f:
            parts = f.read().decode("utf-8").split("---")
        meta = yaml.safe_load(parts[1]) if len(parts) > 2 else None
        configs = (meta or {}).get("configs") or []
        if configs:
            by_name = {c.get("config_name", "default"): c for c in configs}
            return sorted(
                p
                for want in _chosen_configs(config, configs, root, key)
                for p in _config_files(fs, root, by_name[want], want, split, key)
            )
    if not isinstance(config, str | None) or config == "*":
        raise ValueError(
            f"{key}.options.config={config!r}: {root} lists no configs in a README; "
            "allowed: one directory name"
        )
    base = f"{root}/{config}" if config else root
    if config and not fs.isdir(base):
        raise ValueError(f"{key}.options.config={config!r}: no directory {base}")
    out = []
    for p in fs.glob(f"{base}/**"):
        rel = os.path.relpath(p, base)
        if p.endswith(_EXTS) and split in re.split(r"[^a-zA-Z]+", rel):
            out.append(p)
    return sorted(out)


def _chosen_configs(config, configs: list[dict], root: str, key: str) -> list[str]:
    """The config names `config` selects among a README's `configs` (see `_hub_files`)."""
    names = [c.get("config_name", "default") for c in configs]
    if config == "*":
        return names
    if not config:
        default = [c.get("config_name", "default") for c in configs if c.get("default")]
        default = default or [n for n in names if n == "default"]
        if len(names) == 1 or default:
            return default[:1] or names
        raise ValueError(
            f"{key}.options.config={config!r}: {root} has {len(names)} configs and no "
            f"default, so the choice is ambiguous; set one, a list, or '*' for all: {names}"
        )
    wanted = [config] if isinstance(config, str) else list(config)
    for want in wanted:
        if want not in names:
            raise ValueError(f"{key}.options.config={config!r}: not in {root}; allowed: {names}")
    return wanted


def _config_files(fs, root: str, entry: dict, name: str, split: str, key: str) -> list[str]:
    files = entry.get("data_files")
    if isinstance(files, str):
        files = [{"split": "train", "path": files}]
    splits = {d["split"]: d["path"] for d in files}
    if split not in splits:
        raise ValueError(
            f"{key}.options.split={split!r}: not in config {name!r}; allowed: {sorted(splits)}"
        )
    pats = splits[split] if isinstance(splits[split], list) else [splits[split]]
    return [p for pat in pats for p in fs.glob(f"{root}/{pat}")]


def _hub_commit(name: str, revision: str | None, spec: str, key: str) -> str:
    """The commit a hub revision (branch, tag or sha; default main) resolves to now."""
    from huggingface_hub import HfApi

    try:
        return HfApi().dataset_info(name, revision=revision).sha
    except Exception as e:  # offline, unknown id or revision
        raise ValueError(
            f"{key}.source={spec!r}: cannot resolve revision {revision!r} on the hub "
            f"({type(e).__name__}: {e}); pass a local directory laid out like the hub repo"
        ) from e


def _hf_streamed(name: str, opts: dict, text: str, key: str, spec: str) -> Source:
    try:
        import datasets
    except ImportError as e:
        raise ValueError(
            f"{key}.source={spec!r}: reading a hub dataset needs `datasets` (pip install .[hf])"
        ) from e
    config = opts.get("config")
    if not isinstance(config, str | None) or config == "*":
        raise ValueError(
            f"{key}.options.config={config!r}: `datasets` streams one config at a time; "
            "read several without use_datasets"
        )
    local = os.path.isdir(name)
    revision = None if local else _hub_commit(name, opts.get("revision"), spec, key)

    def docs():
        ds = datasets.load_dataset(
            name,
            opts.get("config"),
            split=opts.get("split", "train"),
            streaming=True,
            revision=revision,
        )
        for i, rec in enumerate(ds):
            yield f"{i}", _text_of(rec, text, key, name)

    identity = [name, opts.get("config"), opts.get("split", "train"), revision]
    if local:  # the directory's whole content stands for the commit
        files = sorted(p for p in glob.glob(f"{name}/**", recursive=True) if os.path.isfile(p))
        identity.append(_content_hash(files, name, _local_fs()))
    return _Sequential(spec, fileio.digest(identity, 8), docs, revision)


class TfdsSource(Source):
    """A built TFDS dataset in ArrayRecord format: blocks of consecutive record indices."""

    def __init__(self, spec: str, name: str, split: str, data_dir, text: str, key: str):
        self.spec, self.name, self.split, self.data_dir = spec, name, split, data_dir
        self.text, self.key, self._src = text, key, None
        src = self._open()
        self.num_blocks = -(-len(src) // RECORDS_PER_BLOCK)
        self.fingerprint = fileio.digest(["tfds", src.dataset_info.full_name, split, len(src)], 8)

    def __getstate__(self):  # workers open the data source themselves
        return {**self.__dict__, "_src": None}

    def _open(self):
        if self._src is not None:
            return self._src
        try:
            import tensorflow_datasets as tfds
        except ImportError as e:
            raise ValueError(
                f"{self.key}.source={self.spec!r}: needs tensorflow_datasets and array_record "
                "(pip install .[tfds])"
            ) from e
        try:
            self._src = tfds.data_source(self.name, split=self.split, data_dir=self.data_dir)
            return self._src
        except Exception as e:  # not built, unknown name or split, not ArrayRecord
            raise ValueError(
                f"{self.key}.source={self.spec!r}: no ArrayRecord TFDS data for {self.name!r} "
                f"split {self.split!r} (options.data_dir={self.data_dir!r}); build it with "
                f"download_and_prepare(file_format='array_record') ({type(e).__name__}: {e})"
            ) from e

    def read(self, block: int) -> Iterator[tuple[str, str]]:
        src = self._open()
        lo = block * RECORDS_PER_BLOCK
        for i in range(lo, min(lo + RECORDS_PER_BLOCK, len(src))):
            yield f"{i}", _text_of(src[i], self.text, self.key, self.name)


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
    first task runs out, so every prefix has the mixture's composition. A sequential
    source's blocks enter its store in stream order (store.py), so the rates decide the
    document composition of the domain's store; the stage plans then mix domains, not
    tasks.
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
    return _Sequential(spec, fileio.digest(identity, 8), docs)


def check(domain: "Domain", key: str) -> None:
    """What can be checked of a domain's source without opening it (config validation)."""
    scheme, arg = parse(domain.source, f"{key}.source")
    if scheme == "builtin":
        builtin.check_options(arg, dict(domain.options), f"{key}.options")


def is_hub_id(spec: str) -> bool:
    """Whether `hf:ARG` names a hub repo: ARG is no directory here and does not begin like
    a path (".", "/", "~"), which names a local directory even when it is missing."""
    scheme, _, arg = spec.partition(":")
    return scheme == "hf" and not (os.path.isdir(arg) or arg.startswith((".", "/", "~")))


def open_source(domain: "Domain", key: str) -> Source:
    """The source of `c.data.<domain>` (`key` names it in errors). Checks that files exist."""
    spec = domain.source
    scheme, arg = parse(spec, f"{key}.source")
    opts = dict(domain.options)
    text = domain.text
    if scheme == "builtin":
        return BuiltinSource(spec, arg, builtin.check_options(arg, opts, f"{key}.options"))
    if scheme == "files":
        return _files(arg, text, key, spec)
    if scheme == "hf":
        if opts.get("use_datasets"):
            return _hf_streamed(arg, opts, text, key, spec)
        return _hf(arg, opts, text, key, spec)
    if scheme == "tfds":
        name, _, split = arg.partition(":")
        return TfdsSource(spec, name, split or "train", opts.get("data_dir"), text, key)
    return _seqio(arg, opts, text, key, spec)


def _files(pattern: str, text: str, key: str, spec: str) -> Source:
    """The files a `files:` glob matches; none, or one of an unknown kind, is an error."""
    paths = sorted(
        p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p)
    )
    if not paths:
        raise ValueError(f"{key}.source={spec!r}: no files match {pattern!r}")
    bad = [p for p in paths if not p.endswith(_EXTS)]
    if bad:
        raise ValueError(
            f"{key}.source={spec!r}: unsupported file {bad[0]!r}; allowed: {list(_EXTS)}"
        )
    root = os.path.commonpath([os.path.dirname(p) for p in paths])
    return FileSource(spec, paths, root, text, key)


def _hf(name: str, opts: dict, text: str, key: str, spec: str) -> Source:
    """A hub dataset's data files, read directly: from a local directory laid out like the
    hub repo, or from the hub at the commit its revision resolves to now."""
    split = opts.get("split", "train")
    if is_hub_id(spec):
        revision = _hub_commit(name, opts.get("revision"), spec, key)
        fs, root = _hub_fs(), f"datasets/{name}@{revision}"
    elif os.path.isdir(name):
        fs, root, revision = _local_fs(), os.path.abspath(name), None
    else:
        raise ValueError(f"{key}.source={spec!r}: directory {name!r} not found")
    paths = _hub_files(fs, root, opts.get("config"), split, key)
    if not paths:
        raise ValueError(f"{key}.source={spec!r}: no data files for split {split!r} in {name}")
    return FileSource(spec, paths, root, text, key, revision=revision)
