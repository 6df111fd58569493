"""Normalisation layers, selected by `model.norm`."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from llm_jax.models.model_config import ModelConfig
from llm_jax.registry import Registry

NORMS: Registry[type[nn.Module]] = Registry("norm")


@NORMS.register("layernorm")
class LayerNorm(nn.Module):
    """LayerNorm over the last axis, computed in float32; bias only when `use_bias`."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: jnp.ndarray) -> jnp.ndarray:
        cfg = self.config
        scale_D = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                             (x_BTD.shape[-1],), cfg.param_dtype)
        x32_BTD = x_BTD.astype(jnp.float32)
        mean_BT1 = x32_BTD.mean(-1, keepdims=True)
        var_BT1 = jnp.square(x32_BTD - mean_BT1).mean(-1, keepdims=True)
        y_BTD = (x32_BTD - mean_BT1) * lax.rsqrt(var_BT1 + cfg.norm_eps) * scale_D
        if cfg.use_bias:
            bias_D = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
                                (x_BTD.shape[-1],), cfg.param_dtype)
            y_BTD = y_BTD + bias_D
        return y_BTD.astype(cfg.dtype)


@NORMS.register("rmsnorm")
class RMSNorm(nn.Module):
    """Root-mean-square norm (no centring, no bias), computed in float32."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: jnp.ndarray) -> jnp.ndarray:
        cfg = self.config
        scale_D = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                             (x_BTD.shape[-1],), cfg.param_dtype)
        x32_BTD = x_BTD.astype(jnp.float32)
        ms_BT1 = jnp.square(x32_BTD).mean(-1, keepdims=True)
        return (x32_BTD * lax.rsqrt(ms_BT1 + cfg.norm_eps) * scale_D).astype(cfg.dtype)

