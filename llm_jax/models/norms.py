"""Normalisation layers, selected by `model.norm`.

Both norms compute in float32. On the CPU (`model.cpu_tuning`, models/cpu_tuning.py) they use a hand-written
backward pass that reuses the saved normalised input: left to autodiff, XLA:CPU re-derives the forward chain
inside large transposing backward fusions, which made the whole train step ~25% slower on the shakespeare
recipe. Elsewhere autodiff differentiates the same forward function.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from llm_jax.models.cpu_tuning import cpu_tuned
from llm_jax.models.model_config import ModelConfig
from llm_jax.registry import Registry

NORMS: Registry[type[nn.Module]] = Registry("norm")


def _mean_last(x: jax.Array) -> jax.Array:
    return x.mean(-1, keepdims=True)


def _sum_to_features(x_BTD: jax.Array) -> jax.Array:
    return x_BTD.reshape(-1, x_BTD.shape[-1]).sum(0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def normalize(x_BTD: jax.Array, scale_D: jax.Array, eps: float, center: bool) -> jax.Array:
    """(x - mean) / std * scale for center=True (LayerNorm), x / rms * scale otherwise (RMSNorm); float32."""
    return _normalize_fwd(x_BTD, scale_D, eps, center)[0]


def _normalize_fwd(x_BTD, scale_D, eps, center):
    x_BTD = x_BTD.astype(jnp.float32)
    if center:
        x_BTD = x_BTD - _mean_last(x_BTD)
    rstd_BT1 = lax.rsqrt(_mean_last(x_BTD * x_BTD) + eps)
    xhat_BTD = x_BTD * rstd_BT1
    return xhat_BTD * scale_D, (xhat_BTD, rstd_BT1, scale_D)


def _normalize_bwd(eps, center, residuals, g_BTD):
    xhat_BTD, rstd_BT1, scale_D = residuals
    gs_BTD = g_BTD * scale_D
    projection_BT1 = _mean_last(gs_BTD * xhat_BTD)
    dx_BTD = gs_BTD - xhat_BTD * projection_BT1
    if center:
        dx_BTD = dx_BTD - _mean_last(gs_BTD)
    return dx_BTD * rstd_BT1, _sum_to_features(g_BTD * xhat_BTD).astype(scale_D.dtype)


normalize.defvjp(_normalize_fwd, _normalize_bwd)


def normalize_autodiff(x_BTD: jax.Array, scale_D: jax.Array, eps: float, center: bool) -> jax.Array:
    """`normalize`'s forward function, differentiated by JAX (forward mode works; GPU/TPU fuse it freely)."""
    return _normalize_fwd(x_BTD, scale_D, eps, center)[0]


class _Norm(nn.Module):
    config: ModelConfig
    center = True

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        cfg = self.config
        features = (x_BTD.shape[-1],)
        scale_D = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), features,
                             cfg.param_dtype)
        normalize_fn = normalize if cpu_tuned(cfg.cpu_tuning) else normalize_autodiff
        y_BTD = normalize_fn(x_BTD, scale_D.astype(jnp.float32), cfg.norm_eps, self.center)
        if cfg.use_bias and self.center:
            bias_D = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), features,
                                cfg.param_dtype)
            y_BTD = y_BTD + bias_D
        return y_BTD.astype(cfg.dtype)


@NORMS.register("layernorm")
class LayerNorm(_Norm):
    """LayerNorm over the last axis; bias only when `use_bias`."""

    center = True


@NORMS.register("rmsnorm")
class RMSNorm(_Norm):
    """Root-mean-square norm: no centring, no bias."""

    center = False
