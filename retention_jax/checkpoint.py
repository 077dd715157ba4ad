"""Orbax checkpoints that branch: params, optimizer, data iterator and meta as separate items.

`optimizer` holds everything of the training state but the parameters: the step, the
Adam moments and the stage's traced schedule hyperparameters.

A run directory holds one manager (`<run>/ckpt`). Steps are saved at every evaluation
and every `ckpt.every` steps; the latest step (for resume) and the step with the lowest
validation loss (the stage's result under early stopping) are preserved. A child stage
opens its parent's manager read-only and restores `params` alone, into its own mesh.

Orbax checksums none of the array bytes it writes (only the index of each zarr shard), so
a flipped bit restores as a wrong, often finite, value. Every step therefore carries a
`checksums` item, a digest of each array of `params` and `optimizer`, and every restore
compares the arrays it read with it: a damaged file is named as such, never trained on.
"""

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

VAL_METRIC = "val_loss"
DAMAGED = ".damaged"  # a step set aside: <step>.damaged, which Orbax does not list as a step
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


class Damaged(RuntimeError):
    """A checkpoint step that cannot be read, or whose arrays differ from their checksums."""


def _fmix(h: jax.Array) -> jax.Array:
    """MurmurHash3's finaliser: a bijection of uint32 in which every input bit moves about
    half of the output bits."""
    h = h ^ (h >> 16)
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _digest(x: jax.Array) -> jax.Array:
    """Two sums mod 2**32 of a hash of each element's bits and flat position.

    Integer sums are exact in any order, so the digest is one value under every mesh,
    sharding and process count (a branch restores into another mesh); for a fixed position
    both hashes are bijections of the bits, so any one changed element changes both sums,
    and moved or further changed ones are missed with probability 2**-64."""
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    u = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
    i, stride = jnp.zeros(x.shape, jnp.uint32), 1
    for d in reversed(range(x.ndim)):
        i = i + jax.lax.broadcasted_iota(jnp.uint32, x.shape, d) * np.uint32(stride % 2**32)
        stride *= x.shape[d]
    a = _fmix(u * np.uint32(0x9E3779B1) + i)
    b = _fmix(u ^ _fmix(i * np.uint32(0x27D4EB2F) + np.uint32(0x165667B1)))
    return jnp.stack([a.sum(dtype=jnp.uint32), b.sum(dtype=jnp.uint32)])


@jax.jit
def _digests(leaves: list) -> jax.Array:
    return jnp.stack([_digest(x) for x in leaves])


def checksums(tree: Any) -> dict[str, str]:
    """Each array of `tree` by its path: its digest as 16 hex digits (one small collective
    program per tree structure; the same on every process)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    if not flat:
        return {}
    digests = np.asarray(jax.device_get(_digests([x for _, x in flat])))
    return {
        jax.tree_util.keystr(path): f"{a:08x}{b:08x}"
        for (path, _), (a, b) in zip(flat, digests.tolist())
    }


def _verify(where: str, saved: dict, **trees: Any) -> None:
    """Raises `Damaged`, naming the item and its arrays, where `trees` differ from `saved`."""
    for item, tree in trees.items():
        got = checksums(tree)
        bad = [path for path, digest in got.items() if saved[item].get(path) != digest]
        if bad:
            more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
            raise Damaged(
                f"{where}/{item}: {len(bad)} of {len(got)} arrays differ from the checksums "
                f"saved with them ({', '.join(bad[:3])}{more})"
            )


def _everywhere(ok: bool) -> bool:
    """Whether `ok` holds on every process, so that all take the same path after a read.
    (A file that only some processes fail to read can still end the job: Orbax's restore
    synchronises the processes inside, and the failing ones leave it early.)"""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _read(where: str, read: Callable[[], Any]) -> Any:
    """`read()`, raising `Damaged` naming `where` on every process if it fails on any."""
    try:
        out, failure = read(), None
    except Exception as e:  # Orbax and TensorStore raise many types for damaged files
        out, failure = None, e
    if not _everywhere(failure is None):
        why = f"{type(failure).__name__}: {failure}" if failure else "failed on another process"
        raise Damaged(f"{where} cannot be read ({why})") from failure
    return out


def _set_aside(mngr: ocp.CheckpointManager, step: int) -> str:
    """Renames a damaged step to `<step>.damaged` (kept for inspection; Orbax no longer
    lists it), so that the resumed run can save that step again."""
    src = epath.Path(mngr.directory) / str(step)
    dst, n = epath.Path(f"{src}{DAMAGED}"), 1
    while dst.exists():
        dst, n = epath.Path(f"{src}{DAMAGED}.{n}"), n + 1
    many = jax.process_count() > 1
    if many:  # every process has named the same `dst` before process 0 takes it
        multihost_utils.sync_global_devices(f"name {src}")
    if jax.process_index() == 0:
        src.rename(dst)
    if many:
        multihost_utils.sync_global_devices(f"set aside {src}")
    mngr.reload()
    return str(dst)


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
    """Saves one step with the checksums of its arrays; `val_loss` ranks it for
    preservation as a candidate best."""
    sums = {"params": checksums(params), "optimizer": checksums(optimizer)}
    mngr.save(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            optimizer=ocp.args.StandardSave(optimizer),
            data=grain.checkpoint.CheckpointSave(data_iter),
            meta=ocp.args.JsonSave(meta),
            checksums=ocp.args.JsonSave(sums),
        ),
        metrics=None if val_loss is None else {VAL_METRIC: val_loss},
        force=True,
    )


def restore(
    mngr: ocp.CheckpointManager, step: int, *, params: Any, optimizer: Any, data_iter: Any
) -> tuple[Any, Any, dict]:
    """Restores and verifies everything of `step` for resuming; `data_iter` is restored in
    place. A step that cannot be read or fails its checksums is set aside (`_set_aside`),
    and `Damaged` names it and where it went."""
    where = f"{mngr.directory}/{step}"
    args = ocp.args.Composite(
        params=ocp.args.StandardRestore(params),
        optimizer=ocp.args.StandardRestore(optimizer),
        data=grain.checkpoint.CheckpointRestore(data_iter),
        meta=ocp.args.JsonRestore(),
        checksums=ocp.args.JsonRestore(),
    )
    try:
        r = _read(where, lambda: mngr.restore(step, args=args))
        _verify(where, r.checksums, params=r.params, optimizer=r.optimizer)
    except Damaged as e:
        raise Damaged(f"{e}; set aside as {_set_aside(mngr, step)}") from e
    return r.params, r.optimizer, r.meta


def restore_params(path: str, step: int, target: Any) -> Any:
    """Parameters alone from a (parent's) checkpoint opened read-only, into `target`'s
    shardings, verified against their checksums (`Damaged` otherwise)."""
    mngr = manager(path, read_only=True)
    where = f"{mngr.directory}/{step}"
    args = ocp.args.Composite(
        params=ocp.args.StandardRestore(target), checksums=ocp.args.JsonRestore()
    )
    try:
        r = _read(where, lambda: mngr.restore(step, args=args))
    finally:
        mngr.close()
    _verify(where, r.checksums, params=r.params)
    return r.params
