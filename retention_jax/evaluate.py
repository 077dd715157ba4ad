"""Validation losses of parameters on every domain of the experiment.

Validation token sets are fixed per corpus (the same for every run), so the four
numbers compare across nodes: L_im = post loss of the post-trained model; L_ret, L_ft,
L_pre = post, ft and pre losses of the fine-tuned model (docs/science.md).
"""

import jax
import numpy as np

from retention_jax import runtime as runtime_lib
from retention_jax import trainer


def losses(
    rt: runtime_lib.Runtime,
    fns: trainer.StepFunctions,
    params,
    corpus,
    domains: tuple[str, ...],
    batch: int,
) -> dict[str, float]:
    """Mean next-token loss per domain; one host transfer for all of them."""
    with jax.set_mesh(rt.mesh):  # compiled like the train step (model.shard_rows)
        sums = {
            d: sum(fns.evaluate(params, b) for b in rt.eval_batches(corpus, d, batch, fns))
            for d in domains
        }
    host = jax.device_get(sums)
    return {d: float(np.asarray(s)[0] / max(float(np.asarray(s)[1]), 1.0)) for d, s in host.items()}
