r"""The data pipeline's throughput and memory: the prepare step and the stage-1 loader.

  python benchmarks/data_pipeline.py                       # 50 and 200 MB, byte and SmolLM2
  python benchmarks/data_pipeline.py --mbytes=20 --tokenizers=byte --json=/tmp/d.json

A generated corpus of .jsonl files (built-in prose documents, one block per 8 MiB) is
prepared into a fresh store with 1 worker and with one per core, each in its own
process; peak RSS is the sum over that process and its workers, sampled every 0.1 s.
The loader reads stage-1 batches (batch × seq_len of configs/paper_135m.py) from the
store. Projections: the train tokens every store of a paper config's graph holds,
divided by the measured all-core SmolLM2 rate scaled to 96 cores at the measured
per-worker efficiency, and the loader against the 135M train step on an H100 at 40%
MFU (the dry run's stated rate).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from configs import base, paper_1b, paper_135m  # noqa: E402
from retention_jax import config, cost, data, graph  # noqa: E402
from retention_jax.data import builtin, sources  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOLLM2 = os.path.join(ROOT, "..", "shared", "data", "smollm2-tokenizer")
HOST_CORES = 96


def make_corpus(d: str, mbytes: int) -> str:
    """~mbytes MB of built-in prose documents in .jsonl files of one block (8 MiB) each."""
    os.makedirs(d, exist_ok=True)
    o = builtin.check_options("prose", {}, "k")
    left, i, k = mbytes * 1_000_000, 0, 0
    while left > 0:
        with open(os.path.join(d, f"part-{k:05d}.jsonl"), "w") as f:
            while f.tell() < min(sources.BLOCK_BYTES, left):
                f.write(json.dumps({"text": builtin.document("prose", i, o)}) + "\n")
                i += 1
            left -= f.tell()
        k += 1
    return f"files:{d}/*.jsonl"


def _cfg(source: str, tokenizer: str, cache: str, workers: int, seq_len: int):
    c = base.get_config()
    c.data.update(tokenizer=tokenizer, seq_len=seq_len, cache_dir=cache, workers=workers)
    c.data.val_tokens = seq_len
    c.data.pre.source = source
    return config.parse(c, 1).data


_CHILD = """
import sys, time
sys.path.insert(0, {root!r})
from benchmarks.data_pipeline import _cfg
from retention_jax import data
cfg = _cfg({source!r}, {tok!r}, {cache!r}, {workers}, {seq_len})
t0 = time.perf_counter()
corpus = data.prepare(cfg, {cache!r}, {{"pre": {need}}})
m = corpus.manifests()["pre"]
print("RESULT", time.perf_counter() - t0, m["train"]["target_tokens"], m["train"]["shards"])
"""


def _tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (Linux /proc)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(x.split()[1]) for x in f if x.startswith("VmRSS")) * 1024
            for t in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{t}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            continue
    return total


def prepare_run(source, tok, cache, workers, seq_len, need) -> dict:
    code = _CHILD.format(
        root=ROOT, source=source, tok=tok, cache=cache, workers=workers, seq_len=seq_len, need=need
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    peak = [0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_rss(proc.pid))
            time.sleep(0.1)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, _ = proc.communicate()
    t.join()
    line = next(x for x in out.splitlines() if x.startswith("RESULT"))
    secs, tokens, shards = line.split()[1:]
    return dict(
        seconds=round(float(secs), 2),
        tokens=int(tokens),
        shards=int(shards),
        tokens_per_s=round(int(tokens) / float(secs)),
        peak_rss_gib=round(peak[0] / 2**30, 3),
    )


def rows_in(source: str, tok_spec: str, seq_len: int) -> int:
    """Training rows the corpus gives (a lower bound: 97% of its tokens, less val)."""
    dom = config.Domain(source, "c", "text", {})
    src = sources.open_source(dom, "data.pre")
    tok = data.make_tokenizer(tok_spec)
    sample = [t for _, t in src.read(0)]
    ratio = sum(len(x) + 1 for x in tok.encode_batch(sample)) / sum(len(t) for t in sample)
    size = sum(os.path.getsize(p) for p in src.paths)
    return int(0.90 * size * ratio / seq_len)


def loader_run(cache: str, source: str, seq_len: int, batch: int) -> dict:
    """Stage-1 batches over every row a byte store of the corpus holds (one epoch)."""
    batches = rows_in(source, "byte", seq_len) // batch
    cfg = _cfg(source, "byte", cache, 0, seq_len)
    corpus = data.prepare(cfg, cache, {"pre": batch * batches})
    c = base.get_config()
    c.data.update(tokenizer="byte", seq_len=seq_len, cache_dir=cache, val_tokens=seq_len)
    c.data.pre.source = source
    c.pretrain.update(tokens=batch * batches * seq_len, batch=batch)
    plan = data.plan("pretrain", config.parse(c, 1))
    out = {}
    for threads in (0, 2):
        it = data.loader(corpus, plan, threads)
        next(it)  # thread start-up
        t0, tokens = time.perf_counter(), 0
        for b in it:
            tokens += int(data.tokens_by_domain(b).sum())
        out[f"threads_{threads}_tokens_per_s"] = round(tokens / (time.perf_counter() - t0))
    return out


def graph_train_tokens(cfg) -> int:
    """Train tokens the stores of a config's graph hold (every node's plan)."""
    nodes = graph.expand(cfg, config.smallest_devices(cfg.mesh))
    needs = data.needs_of([n.plan for n in nodes])
    return sum(needs.values()) * nodes[0].exp.data.seq_len


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mbytes", default="50,200")
    ap.add_argument("--tokenizers", default=f"byte,hf:{SMOLLM2}")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    c135 = paper_135m.get_config("musicpile-chempile")
    seq_len, batch = c135.data.seq_len, c135.pretrain.batch
    cores = os.cpu_count() or 1
    report = dict(cores=cores, seq_len=seq_len, prepare=[])
    with tempfile.TemporaryDirectory() as tmp:
        for mb in [int(x) for x in args.mbytes.split(",")]:
            source = make_corpus(os.path.join(tmp, f"corpus{mb}"), mb)
            for tok in args.tokenizers.split(","):
                need = rows_in(source, tok, seq_len)
                for workers in (1, cores):
                    cache = os.path.join(tmp, f"cache-{mb}-{len(report['prepare'])}")
                    r = prepare_run(source, tok, cache, workers, seq_len, need)
                    r.update(mbytes=mb, tokenizer=tok.split("/")[-1], workers=workers)
                    report["prepare"].append(r)
                    print(json.dumps(r), flush=True)
        report["loader"] = loader_run(os.path.join(tmp, "loader"), source, seq_len, batch)
    smol = [r for r in report["prepare"] if r["tokenizer"] != "byte" and r["mbytes"] == mb]
    if len(smol) == 2:
        one, all_ = sorted(smol, key=lambda r: r["workers"])
        speedup = all_["tokens_per_s"] / one["tokens_per_s"]
        per_worker = one["tokens_per_s"] * speedup / cores  # each core at the measured efficiency
        report["smollm2_speedup"] = round(speedup, 2)
        report["projected_96_core_hours"] = {
            name: round(graph_train_tokens(cfg) / (per_worker * HOST_CORES) / 3600, 2)
            for name, cfg in (("135m", c135), ("1b", paper_1b.get_config("musicpile-chempile")))
        }
    c135_exp = config.parse(c135, config.smallest_devices(c135.mesh))
    flops = cost.flops_per_token(c135_exp.model, seq_len)
    h100 = cost.PLAN_MFU * cost.PEAK_BF16[cost.PLAN_DEVICE] / flops
    report["loader"]["h100_135m_step_tokens_per_s"] = round(h100)
    report["loader"]["ratio_to_h100_step"] = round(
        report["loader"]["threads_2_tokens_per_s"] / h100, 1
    )
    print(json.dumps(report, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
