"""The data layer: which tokens a model sees and when, exact, deterministic and resumable.

  validate(cfg)                       every data key, before anything runs (checks.py)
  plan(stage, cfg) -> StagePlan       exact budgets and the stream's index map (plan.py)
  prepare(cfg, workdir, plans) -> Corpus   tokenized, cached, memory-mapped stores (store.py)
  loader(corpus, plan, cfg)           grain iterator of host batches (loader.py)
  validation_batches, tokens_by_domain, to_global   (loader.py)

Sources (sources.py, builtin.py), tokenizers (tokenizer.py), packing (packing.py) and
random-access permutations (permute.py) sit underneath. DOMAINS fixes the order of the
three domains: batch["domain"] indexes it and c.data.pre/.post/.ft configure them.
"""

from retention_jax.data.checks import DOMAINS, STAGES, validate
from retention_jax.data.loader import KEYS, loader, to_global, tokens_by_domain, validation_batches
from retention_jax.data.plan import StagePlan, plan
from retention_jax.data.store import Corpus, prepare
from retention_jax.data.tokenizer import make_tokenizer

__all__ = [
    "DOMAINS",
    "KEYS",
    "STAGES",
    "Corpus",
    "StagePlan",
    "loader",
    "make_tokenizer",
    "plan",
    "prepare",
    "to_global",
    "tokens_by_domain",
    "validate",
    "validation_batches",
]
