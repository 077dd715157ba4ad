"""Orbax checkpoints that branch: params, optimizer, data iterator and meta as separate items.

`optimizer` holds everything of the training state but the parameters: the step, the
Adam moments and the stage's traced schedule hyperparameters.

A run directory holds one manager (`<run>/ckpt`). Steps are saved at every evaluation
and every `ckpt.every` steps; the latest step (for resume) and the step with the lowest
validation loss (the stage's result under early stopping) are preserved. A child stage
opens its parent's manager read-only and restores `params` alone, into its own mesh.
"""

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import grain
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

VAL_METRIC = "val_loss"
# Orbax announces every read-only manager; a branch opens one per node, as designed.
_READ_ONLY_NOTICE = "Given directory is read only=%s"


class _DropReadOnlyNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != _READ_ONLY_NOTICE


@contextlib.contextmanager
def _quiet_read_only() -> Iterator[None]:
    """Drops Orbax's read-only notice (and only it) while a read-only manager is built."""
    logger, quiet = logging.getLogger("absl"), _DropReadOnlyNotice()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def manager(path: str, *, read_only: bool = False) -> ocp.CheckpointManager:
    keep = pp.AnyPreservationPolicy(
        [
            pp.LatestN(2),  # the one before the latest: a fallback if the latest is damaged
            pp.BestN(
                get_metric_fn=lambda m: m[VAL_METRIC],
                reverse=True,  # keeps the lowest
                n=1,
                keep_checkpoints_without_metrics=False,
            ),
        ]
    )
    options = ocp.CheckpointManagerOptions(
        preservation_policy=keep,
        read_only=read_only,
        create=not read_only,
        # Orbax resets (and warns about) a save interval on read-only managers: none set.
        **({"save_interval_steps": 0} if read_only else {}),
    )
    with _quiet_read_only() if read_only else contextlib.nullcontext():
        return ocp.CheckpointManager(path, options=options)


def save(
    mngr: ocp.CheckpointManager,
    step: int,
    *,
    params: Any,
    optimizer: Any,
    data_iter: Any,
    meta: dict,
    val_loss: float | None = None,
) -> None:
    """Saves one step; `val_loss` ranks it for preservation as a candidate best."""
    mngr.save(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            optimizer=ocp.args.StandardSave(optimizer),
            data=grain.checkpoint.CheckpointSave(data_iter),
            meta=ocp.args.JsonSave(meta),
        ),
        metrics=None if val_loss is None else {VAL_METRIC: val_loss},
        force=True,
    )


def restore(
    mngr: ocp.CheckpointManager, step: int, *, params: Any, optimizer: Any, data_iter: Any
) -> tuple[Any, Any, dict]:
    """Restores everything of `step` for resuming; `data_iter` is restored in place."""
    r = mngr.restore(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardRestore(params),
            optimizer=ocp.args.StandardRestore(optimizer),
            data=grain.checkpoint.CheckpointRestore(data_iter),
            meta=ocp.args.JsonRestore(),
        ),
    )
    return r.params, r.optimizer, r.meta


def restore_params(path: str, step: int, target: Any) -> Any:
    """Parameters alone from a (parent's) checkpoint opened read-only, into `target`'s shardings."""
    mngr = manager(path, read_only=True)
    try:
        return mngr.restore(
            step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target))
        ).params
    finally:
        mngr.close()
