"""Validation losses of parameters on every domain of the experiment.

Validation token sets are fixed per corpus (the same for every run), so the four
numbers of SCIENCE.md compare across nodes: L_im = post loss of the post-trained model;
L_ret, L_ft, L_pre = post, ft and pre losses of the fine-tuned model.
"""

import jax
import numpy as np

from retention_jax import data
from retention_jax import train as train_lib

_DEVICE_BATCHES: dict[tuple, list] = {}


def _device_batches(corpus, domain: str, batch: int, steps: train_lib.Steps) -> list:
    """The domain's validation batches on the mesh; each process supplies its own rows."""
    key = (corpus.fingerprint, domain, batch, steps.mesh)
    if key not in _DEVICE_BATCHES:
        n, p = jax.process_count(), jax.process_index()
        rows = slice(p * batch // n, (p + 1) * batch // n)
        _DEVICE_BATCHES[key] = [
            data.to_global(
                {k: v[rows] for k, v in b.items()}, steps.mesh, steps.batch_sharding.spec
            )
            for b in data.validation_batches(corpus, domain, batch)
        ]
    return _DEVICE_BATCHES[key]


def losses(
    steps: train_lib.Steps, params, corpus, domains: tuple[str, ...], batch: int
) -> dict[str, float]:
    """Mean next-token loss per domain; one host transfer for all of them."""
    sums = {
        d: sum(steps.evaluate(params, b) for b in _device_batches(corpus, d, batch, steps))
        for d in domains
    }
    host = jax.device_get(sums)
    return {d: float(np.asarray(s)[0] / max(float(np.asarray(s)[1]), 1.0)) for d, s in host.items()}
