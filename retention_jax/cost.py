"""What training costs, from configs alone: FLOPs per token and the datasheet peaks.

Pure arithmetic (no JAX), so the graph's dry-run table, the benchmarks and the
throughput accounting share one formula and one table.
"""

from retention_jax import config

PEAK_BF16 = {  # device_kind substring -> dense bf16 FLOP/s per chip
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "H100": 989.5e12,
    "H200": 989.5e12,
    "A100": 312e12,
}
PLAN_DEVICE, PLAN_MFU = "H100", 0.4  # the dry run's device-hours estimate (a stated rate)


def flops_per_token(cfg: config.Model, seq_len: int) -> float:
    """Training FLOPs per token: 6*N_matmul + 6*n_layers*seq_len*(n_heads*head_dim).

    MaxText convention: forward+backward = 3x forward, 2 FLOPs per multiply-add, and
    causal attention counted at half of the full QK^T and PV matmuls (Levanter counts
    full attention, 12*L*s*d). N_matmul = per-layer projections plus the LM head (the
    tied embedding is counted once, as the head); norms and the embedding gather are not
    matmuls. LoRA adapters are ignored.
    """
    d, h, kv, hd, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_mlp
    per_layer = d * hd * (2 * h + 2 * kv) + 3 * d * f
    n_matmul = cfg.n_layers * per_layer + d * cfg.vocab_size
    return 6.0 * n_matmul + 6.0 * cfg.n_layers * seq_len * h * hd


def device_hours(flops: float) -> float:
    """Hours of one PLAN_DEVICE at PLAN_MFU of its bf16 peak for `flops` of training."""
    return flops / (PLAN_MFU * PEAK_BF16[PLAN_DEVICE]) / 3600
