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


# Per token and layer, the activation elements a step keeps for its backward pass, by
# `model.remat` (d: d_model, f: d_mlp): every intermediate (none), the matmul outputs
# (dots), the layer input (full). Attention probabilities (heads x seq_len) come on top
# unless the attention is a fused kernel (cudnn, splash) that recomputes them.
REMAT_ELEMENTS = {"none": (12, 4), "dots": (4, 2), "full": (1, 0)}  # (× d, × f)
FUSED_ATTENTION = ("cudnn", "splash")
LOGIT_COPIES = 2  # float32 logits and their gradient


def step_memory(model, params: int, rows: int, seq_len: int, shards: int) -> dict[str, int]:
    """Estimated bytes on one device for one training step of `rows` sequences (one
    microbatch): `state` = parameters, gradients and Adam's two moments, sharded over
    `shards` devices (fsdp × tensor); `activations` = what the backward pass keeps
    (REMAT_ELEMENTS, plus one layer's full set while it is recomputed); `logits`. An
    estimate to refuse what cannot fit, not a layout: `--topology` compiles the real one."""
    act = 2 if model.dtype == "bfloat16" else 4
    weights = 2 if model.param_dtype == "bfloat16" else 4
    tokens = rows * seq_len
    d_x, f_x = REMAT_ELEMENTS[model.remat]
    probs = 0 if model.attention in FUSED_ATTENTION else model.n_heads * seq_len
    saved = d_x * model.d_model + f_x * model.d_mlp + (probs if model.remat != "full" else 0)
    full = REMAT_ELEMENTS["none"][0] * model.d_model + 4 * model.d_mlp + probs
    positions = min(model.loss_chunk, seq_len) if model.loss_chunk else seq_len
    return {
        "state": params * (2 * weights + ADAM_BYTES) // shards,
        "activations": tokens * act * (model.n_layers * saved + full),
        "logits": rows * positions * model.vocab_size * 4 * LOGIT_COPIES,
    }


def device_memory() -> tuple[int, str]:
    """(bytes one local device can hold, what was measured): the accelerator's limit, or
    on the CPU the host's RAM shared by its (possibly fake) devices."""
    import jax  # here: the other checks need no JAX

    dev = jax.local_devices()[0]
    stats = dev.memory_stats() if dev.platform != "cpu" else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{dev.device_kind} memory"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return ram // jax.local_device_count(), f"host RAM / {jax.local_device_count()} devices"


def check_memory(need: dict[str, int], where: str, knobs: str) -> None:
    """Refuses a step whose estimate exceeds the device's memory, with the numbers."""
    have, what = device_memory()
    total = sum(need.values())
    if total > have:
        parts = " + ".join(f"{k} {v / 2**30:.2f}" for k, v in need.items())
        raise PreflightError(
            f"{where}: a training step needs about {total / 2**30:.2f} GiB per device "
            f"({parts} GiB, estimated), {have / 2**30:.2f} GiB available ({what}); "
            f"lower {knobs}"
        )


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
