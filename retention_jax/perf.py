"""Throughput accounting: model FLOP/s per device and MFU.

Training FLOPs per token follow the MaxText convention (`cost.flops_per_token`).
Peak dense bf16 FLOP/s per chip are vendor numbers; on a device not listed (a CPU) the
peak is measured with a large matmul in the compute dtype, so MFU stays defined.
"""

import time

import jax
import jax.numpy as jnp

from retention_jax import cost


def measured_peak(dtype: str = "float32", n: int = 1024, reps: int = 5) -> float:
    """FLOP/s of an n×n matmul on the default device: the host's practical peak."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(reps):
        out = f(a)
    out.block_until_ready()
    return 2 * n**3 * reps / (time.perf_counter() - start)


def peak_flops(device: jax.Device | None = None, dtype: str = "float32") -> tuple[float, str]:
    """(peak FLOP/s per device, where the number comes from)."""
    kind = (device or jax.devices()[0]).device_kind
    for name, peak in cost.PEAK_BF16.items():
        if name in kind:
            return peak, f"{name} bf16 datasheet"
    return measured_peak(dtype), f"measured {dtype} matmul on {kind}"


def throughput(tokens: float, seconds: float, flops_per_token: float, peak: float) -> dict:
    per_device = tokens / max(seconds, 1e-9) / jax.device_count()
    tflops = per_device * flops_per_token / 1e12
    return {
        "tokens_per_s": tokens / max(seconds, 1e-9),
        "tflops_per_device": tflops,
        "mfu": tflops * 1e12 / peak,
    }
