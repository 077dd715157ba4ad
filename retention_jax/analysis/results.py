"""Reading `<workdir>/results.jsonl` (one JSON object per fine-tuned leaf) and grouping rows.

The row schema and `method_of` belong to the core (`retention_jax.results`), which writes
the rows; this module only reads them.
"""

import json
import os

from retention_jax import fileio
from retention_jax.results import COMPUTE_MATCHED, LOSSES, method_of

__all__ = [
    "COMPUTE_MATCHED",
    "LOSSES",
    "group",
    "load",
    "method",
    "method_of",
    "pipeline",
    "replicate",
]


def load(workdir_or_path: str) -> list[dict]:
    """Rows of a results.jsonl, given the file or the work directory holding it."""
    path = str(workdir_or_path)
    if not path.endswith(".jsonl"):
        path = os.path.join(path, "results.jsonl")  # also joins gs:// paths correctly
    text = fileio.read_text(path)
    if text is None:
        raise FileNotFoundError(f"{path}: no results file")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def method(row: dict) -> str:
    """The row's recorded method, or the one `method_of` gives it."""
    return row.get("method") or method_of(row)


def replicate(row: dict) -> int:
    """The copy of the graph a row belongs to; rows written before replicates were
    recorded pair by their seed."""
    return row.get("replicate", row.get("seed", 0))


def pipeline(row: dict) -> str:
    return row.get("pipeline") or f"{row['d_post']}->{row['d_ft']}"


def tokens_label(n: int | None) -> str:
    """300000000 -> '300M'."""
    if n is None:
        return "?"
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


def group(row: dict) -> str:
    """Rows whose frontiers compare: one pipeline, one D_post pool, one exposure mode."""
    label = pipeline(row)
    if row.get("pool_tokens") is not None:
        label += f", |D_post| {tokens_label(row['pool_tokens'])}"
    mode = row.get("exposure_mode", "add")
    return label if mode == "add" else f"{label}, {mode}"
