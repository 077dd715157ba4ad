r"""Tokens/s of the whole data pipeline: prepare (tokenize + pack) and the stage-1 loader.

  python benchmarks/data_pipeline.py                     # byte tokenizer, built-in domains
  python benchmarks/data_pipeline.py --tokenizer=hf:../shared/data/smollm2-tokenizer

Reports prepare throughput (source -> tokenize -> pack -> memory-mapped store, tokens/s)
and loader throughput (plan lookup -> gather -> batch, target tokens/s) for a stage 1
with early exposure λ = 0.5. Each run uses a fresh cache so prepare is measured.
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from configs import base  # noqa: E402
from retention_jax import config, data  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", default="byte")
    ap.add_argument("--tokens", type=int, default=4_000_000, help="stage-1 D_pre tokens")
    ap.add_argument("--seq_len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=0)
    args = ap.parse_args()
    c = base.get_config()
    c.data.tokenizer = args.tokenizer
    c.data.seq_len = args.seq_len
    c.data.workers = args.workers
    c.data.post_pool_tokens = args.tokens // 4
    c.pretrain.tokens = args.tokens
    c.pretrain.batch = args.batch
    c.pretrain.exposure.lam = 0.5
    with tempfile.TemporaryDirectory() as tmp:
        c.data.cache_dir = tmp
        exp = config.parse(c, 1)
        plan = data.plan("pretrain", exp)
        t0 = time.perf_counter()
        corpus = data.prepare(exp.data, tmp, data.needs_of([plan]))
        t_prep = time.perf_counter() - t0
        prepared = sum(
            m["train"]["target_tokens"] + m["val"]["target_tokens"]
            for m in corpus.manifests().values()
        )
        t0 = time.perf_counter()
        total = np.zeros(len(data.DOMAINS), np.int64)
        for b in data.loader(corpus, plan, exp.data.workers):
            total += data.tokens_by_domain(b)
        t_load = time.perf_counter() - t0
    out = dict(
        tokenizer=args.tokenizer,
        seq_len=args.seq_len,
        batch=args.batch,
        prepare_tokens=int(prepared),
        prepare_tokens_per_s=round(prepared / t_prep),
        loader_tokens=int(total.sum()),
        loader_tokens_per_s=round(total.sum() / t_load),
        end_to_end_tokens_per_s=round(total.sum() / (t_prep + t_load)),
    )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
