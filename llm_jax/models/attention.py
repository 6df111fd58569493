"""Causal multi-head (and grouped-query) self-attention through jax.nn.dot_product_attention."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_jax.models.model_config import ModelConfig
from llm_jax.models.positions import POSITIONALS


class Projection(nn.Module):
    """A multi-axis linear map written as one einsum, with logically named kernel axes."""

    config: ModelConfig
    equation: str  # e.g. "btd,dnh->btnh"
    kernel_shape: tuple[int, ...]
    kernel_axes: tuple[str, ...]
    std: float
    bias_axes_count: int  # trailing kernel axes that the bias covers

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        cfg = self.config
        kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.normal(self.std), self.kernel_axes),
                            self.kernel_shape, cfg.param_dtype)
        y = jnp.einsum(self.equation, x, kernel.astype(cfg.dtype))
        if cfg.use_bias:
            bias_axes = self.kernel_axes[-self.bias_axes_count:]
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, bias_axes),
                              self.kernel_shape[-self.bias_axes_count:], cfg.param_dtype)
            y = y + bias.astype(cfg.dtype)
        return y


def attention_mask(segment_ids_BT: jnp.ndarray | None) -> jnp.ndarray | None:
    """Blocks attention across packed segments; causality is handled by is_causal."""
    if segment_ids_BT is None:
        return None
    return (segment_ids_BT[:, None, :, None] == segment_ids_BT[:, None, None, :])


class CausalSelfAttention(nn.Module):
    """q/k/v projections to heads, optional rotary positions, causal softmax attention, output projection."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: jnp.ndarray, positions_BT: jnp.ndarray,
                 segment_ids_BT: jnp.ndarray | None = None) -> jnp.ndarray:
        cfg = self.config
        N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        D = cfg.d_model
        q_BTNH = Projection(cfg, "btd,dnh->btnh", (D, N, H), ("embed", "heads", "head_dim"), cfg.init_std, 2,
                            name="query")(x_BTD)
        k_BTKH = Projection(cfg, "btd,dkh->btkh", (D, K, H), ("embed", "kv_heads", "head_dim"), cfg.init_std, 2,
                            name="key")(x_BTD)
        v_BTKH = Projection(cfg, "btd,dkh->btkh", (D, K, H), ("embed", "kv_heads", "head_dim"), cfg.init_std, 2,
                            name="value")(x_BTD)
        rotate = POSITIONALS.get(cfg.positional).rotate_qk
        if rotate is not None:
            q_BTNH = rotate(q_BTNH, positions_BT, cfg.rope_base)
            k_BTKH = rotate(k_BTKH, positions_BT, cfg.rope_base)
        q_BTNH = nn.with_logical_constraint(q_BTNH, ("batch", "seq", "act_heads", None))
        k_BTKH = nn.with_logical_constraint(k_BTKH, ("batch", "seq", "act_kv_heads", None))
        v_BTKH = nn.with_logical_constraint(v_BTKH, ("batch", "seq", "act_kv_heads", None))
        out_BTNH = jax.nn.dot_product_attention(
            q_BTNH, k_BTKH, v_BTKH, mask=attention_mask(segment_ids_BT), is_causal=True)
        out_BTNH = nn.with_logical_constraint(out_BTNH, ("batch", "seq", "act_heads", None))
        return Projection(cfg, "btnh,nhd->btd", (N, H, D), ("heads", "head_dim", "embed"), cfg.residual_init_std,
                          1, name="out")(out_BTNH)
