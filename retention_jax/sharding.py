"""The device mesh, the logical-to-mesh rule table, and multi-host start-up.

Parameters carry logical axis names ("embed", "mlp", ...); the config's rule table maps
them onto the mesh axes (data, fsdp, tensor). The same code therefore runs on one CPU,
eight fake CPU devices, a GPU node or a TPU pod: only the config changes.
"""

import logging
import math
import os
from collections.abc import Sequence

import jax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")  # mesh axes the batch dimension is split over


def mesh_shape(sizes: dict, num_devices: int) -> tuple[int, ...]:
    """Resolves one -1 entry to the devices left over; checks the product."""
    shape = [int(sizes[a]) for a in AXES]
    if shape.count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(AXES, shape))}")
    for axis, n in zip(AXES, shape):
        if n == 0 or n < -1:
            raise ValueError(f"mesh.{axis}={n}: allowed a positive size or -1")
    known = math.prod(n for n in shape if n != -1)
    if -1 in shape:
        if num_devices % known:
            raise ValueError(f"mesh {dict(zip(AXES, shape))}: {num_devices} devices not divisible")
        shape[shape.index(-1)] = num_devices // known
    if math.prod(shape) != num_devices:
        raise ValueError(
            f"mesh {dict(zip(AXES, shape))} needs {math.prod(shape)} devices, "
            f"{num_devices} are available"
        )
    return tuple(shape)


def make_mesh(sizes: dict, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(sizes, len(devices))
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """[batch, length] arrays: rows over data×fsdp, length replicated."""
    return NamedSharding(mesh, P(BATCH, None))


def initialize_distributed() -> None:
    """Joins a multi-process job when one is configured; a no-op on a single host.

    TPU VMs and SLURM/Open MPI GPU jobs are detected by JAX itself; a coordinator can
    also be given explicitly with JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
    JAX_PROCESS_ID.
    """
    explicit = "JAX_COORDINATOR_ADDRESS" in os.environ
    cluster = any(
        k in os.environ for k in ("TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE")
    )
    if not (explicit or cluster):
        return
    if explicit:
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    else:
        jax.distributed.initialize()
    logging.info("process %d of %d", jax.process_index(), jax.process_count())
