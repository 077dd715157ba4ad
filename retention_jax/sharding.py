"""The device mesh, the logical-to-mesh rule table, and multi-host start-up.

Parameters carry logical axis names ("embed", "mlp", ...); the config's rule table maps
them onto the mesh axes (data, fsdp, tensor). The same code therefore runs on one CPU,
eight fake CPU devices, a GPU node or a TPU pod: only the config changes.
"""

import logging
import os
from collections.abc import Sequence

import jax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from retention_jax import config

AXES = config.MESH_AXES
BATCH = ("data", "fsdp")  # mesh axes the batch dimension is split over


def make_mesh(sizes: dict, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """The (data, fsdp, tensor) mesh; one size may be -1 (the devices left over)."""
    devices = list(devices if devices is not None else jax.devices())
    shape = config.mesh_shape(sizes, len(devices))
    return jax.make_mesh(
        tuple(shape[a] for a in AXES),
        AXES,
        axis_types=(AxisType.Auto,) * len(AXES),
        devices=devices,
    )


def platform() -> str:
    """The platform a program traced now is compiled for: that of the mesh in context (a
    TPU slice's compile-only devices on a CPU host), else the default backend's. Every
    backend-dependent choice of the model asks this, so a deviceless TPU compile gets the
    TPU's choices."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    return device.platform if device is not None else jax.default_backend()


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
