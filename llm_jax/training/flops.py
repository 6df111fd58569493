"""Model FLOPs per token and per-device peak FLOP/s, for train/mfu."""

from __future__ import annotations

import jax

from llm_jax.models.model_config import ModelConfig

# Dense bf16 peak FLOP/s per device (chip for TPU), from the vendors' published specifications.
PEAK_FLOPS_BY_DEVICE_KIND = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters that take part in matmuls per token (embedding lookups excluded, output head included)."""
    attention = cfg.d_model * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    mlp = cfg.d_model * cfg.d_ff * (3 if cfg.mlp == "gated" else 2)
    return cfg.num_layers * (attention + mlp) + cfg.d_model * cfg.vocab_size


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """6N for the weights plus 12 * layers * heads * head_dim * seq_len for attention (PaLM appendix B)."""
    return 6.0 * matmul_params(cfg) + 12.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len


def peak_flops_per_device(override: float | None) -> float | None:
    """The configured peak, else the table entry for this device kind, else None (no MFU, e.g. on CPU)."""
    if override:
        return override
    kind = jax.devices()[0].device_kind
    for prefix, flops in sorted(PEAK_FLOPS_BY_DEVICE_KIND.items(), key=lambda item: -len(item[0])):
        if kind.startswith(prefix):
            return flops
    return None
