"""The data layer: which tokens a model sees and when, exact, deterministic and resumable.

  plan(stage, exp) -> StagePlan       exact budgets and the stream's index map (plan.py)
  prepare(data_cfg, root, needs) -> Corpus   the prepare step: parallel, sharded, resumable
                                      token stores (prep.py; layout in store.py)
  loader(corpus, plan, threads)       grain iterator of host batches (pipeline.py)
  validation_batches, tokens_by_domain, to_global   (pipeline.py)

Sources (sources.py, builtin.py), tokenizers (tokenizer.py), packing (packing.py) and
random-access permutations (permute.py) sit underneath. Configs arrive typed
(`retention_jax.config`), validated once; DOMAINS fixes the order of the three domains:
batch["domain"] indexes it and c.data.pre/.post/.ft configure them.

The loader (grain, and with it jax) is imported on first use, so the prepare step's
worker processes start in a fraction of a second, without either.
"""

import importlib

from retention_jax.config import DOMAINS
from retention_jax.data.packing import KEYS
from retention_jax.data.plan import StagePlan, plan
from retention_jax.data.prep import prepare
from retention_jax.data.store import Corpus, StoreError, needs_of
from retention_jax.data.tokenizer import make_tokenizer

_LOADER = ("loader", "to_global", "tokens_by_domain", "validation_batches")


def __getattr__(name: str):
    if name in _LOADER:
        pipeline = importlib.import_module("retention_jax.data.pipeline")
        globals().update({n: getattr(pipeline, n) for n in _LOADER})
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DOMAINS",
    "KEYS",
    "Corpus",
    "StagePlan",
    "StoreError",
    "loader",
    "make_tokenizer",
    "needs_of",
    "plan",
    "prepare",
    "to_global",
    "tokens_by_domain",
    "validation_batches",
]
