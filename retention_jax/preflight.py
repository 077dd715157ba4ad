"""Checks that fail in seconds what would otherwise fail after tokenization and compile.

Each check is cheap and needs nothing built: an unwritable work directory, a disk too
small for the planned checkpoints would otherwise
surface only at the first save, minutes to hours into a job (the mesh and every other
config value are checked by `config.parse`). Every error names the path and the remedy.
"""

import os
import shutil
import uuid

from etils import epath

from retention_jax.errors import UserError

# Bytes per parameter in one checkpoint: float32 parameters plus Adam's two float32 moments.
PARAM_BYTES = 4
ADAM_BYTES = 8


class PreflightError(UserError, RuntimeError):
    """A job that would fail later; the message says what to change."""


def check_writable(workdir: str) -> None:
    """Creates, reads back and removes a probe file in `workdir` (local or gs://)."""
    root = epath.Path(workdir)
    probe = root / f".preflight-{uuid.uuid4().hex}"
    token = uuid.uuid4().hex
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe.write_text(token)
        if probe.read_text() != token:
            raise OSError("the probe file read back different contents")
        probe.unlink()
    except OSError as e:
        raise PreflightError(
            f"workdir {workdir} is not writable ({type(e).__name__}: {e}); pass a --workdir "
            "this job can create files in, or grant it write access"
        ) from e


def checkpoint_bytes(params: int, keep: int, nodes: int) -> int:
    """Disk the planned checkpoints take: params × (4 + 8) bytes × kept steps × nodes."""
    return params * (PARAM_BYTES + ADAM_BYTES) * keep * nodes


def _existing(path: str) -> str:
    """The nearest existing directory at or above `path` (the one whose disk is used)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def check_free_space(workdir: str, *, params: int, keep: int, nodes: int) -> tuple[int, int | None]:
    """(bytes needed, bytes free); raises if a local disk is too small.

    `params` is the model's parameter count, `keep` the checkpoint steps kept per node
    (latest and best: 2 at most), `nodes` how many nodes will checkpoint into `workdir`.
    Object stores (gs://) report no free space; there only the estimate is returned.
    """
    for key, value in (("params", params), ("keep", keep), ("nodes", nodes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"preflight {key}={value!r}: allowed an integer >= 0")
    need = checkpoint_bytes(params, keep, nodes)
    if "://" in workdir:
        return need, None
    free = shutil.disk_usage(_existing(workdir)).free
    if need > free:
        raise PreflightError(
            f"workdir {workdir}: the planned checkpoints need {need / 2**30:.2f} GiB "
            f"({nodes} nodes × {keep} steps × {params:,} params × "
            f"{PARAM_BYTES + ADAM_BYTES} bytes), {free / 2**30:.2f} GiB are free; free space, "
            "pass a --workdir on a larger disk (or gs://), or run fewer nodes with --only"
        )
    return need, free


def check(
    workdir: str,
    *,
    params: int,
    keep: int,
    nodes: int,
) -> None:
    """Every check above, cheapest first."""
    check_writable(workdir)
    check_free_space(workdir, params=params, keep=keep, nodes=nodes)
