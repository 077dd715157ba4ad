"""What a dry run opens of the data: every source and tokenizer, nothing tokenized.

A local path that is wrong (a `files:` glob that matches nothing, a missing directory or
model file) fails the dry run as it would fail the prepare step. A hub id that cannot be
reached from this machine (no network, as on a laptop planning a pod run) is reported as
unchecked instead: the prepare step on the machine that has the network opens it.
"""

from retention_jax.config import DOMAINS, Data
from retention_jax.data import sources
from retention_jax.data.tokenizer import make_tokenizer
from retention_jax.errors import UserError


def open_all(cfg: Data) -> list[str]:
    """Opens the tokenizer and the three sources of `cfg`; a bad local path raises
    UserError.
    Returns one line per hub id that could not be reached (left to the prepare step)."""
    unchecked = []
    specs = [("data.tokenizer", cfg.tokenizer, lambda: make_tokenizer(cfg.tokenizer))]
    for d in DOMAINS:
        domain = cfg.domain(d)
        specs.append(
            (
                f"data.{d}.source",
                domain.source,
                lambda dom=domain, k=f"data.{d}": sources.open_source(dom, k),
            )
        )
    for key, spec, open_ in specs:
        try:
            open_()
        except Exception as e:
            if not sources.is_hub_id(spec):
                raise UserError(str(e)) from e  # the message names the key and the path
            unchecked.append(
                f"{key}={spec!r}: not checked, the hub is out of reach here "
                f"({type(e).__name__}); the prepare step opens it"
            )
    return unchecked
