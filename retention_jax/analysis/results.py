"""Reading `<workdir>/results.jsonl` (one JSON object per fine-tuned leaf) and naming methods.

Dependency-free on purpose: the experiment module imports `method_of` to fill "method".
"""

import json
import os

LOSSES = ("L_im", "L_ret", "L_ft", "L_pre")
COMPUTE_MATCHED = " (compute-matched)"


def _read_text(path: str) -> str:
    try:
        from etils import epath
    except ImportError:  # plain files only
        with open(path) as f:
            return f.read()
    return epath.Path(path).read_text()


def load(workdir_or_path: str) -> list[dict]:
    """Rows of a results.jsonl, given the file or the work directory holding it."""
    path = str(workdir_or_path)
    if not path.endswith(".jsonl"):
        path = os.path.join(path, "results.jsonl")  # also joins gs:// paths correctly
    return [json.loads(line) for line in _read_text(path).splitlines() if line.strip()]


def method_of(row: dict) -> str:
    """'unmixed' (lam == 0) or 'mixed', then '+dropout', '+replay', ' (compute-matched)'."""
    name = "mixed" if row.get("lam", 0.0) > 0 else "unmixed"
    if row.get("dropout", 0.0) > 0:
        name += "+dropout"
    if row.get("replay", 0.0) > 0:
        name += "+replay"
    if row.get("compute_matched", False):
        name += COMPUTE_MATCHED
    return name


def method(row: dict) -> str:
    """The row's recorded method, or the one `method_of` gives it."""
    return row.get("method") or method_of(row)


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
