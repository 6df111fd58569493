"""Position-wise feed-forward layers, selected by `model.mlp`: `standard` and `gated` read `model.activation`;
the named variants fix it (gelu, relu: standard; swiglu = gated + silu, geglu = gated + gelu)."""

from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax

from llm_jax.models.model_config import ModelConfig
from llm_jax.registry import Registry

ACTIVATIONS: Registry[Callable[[jax.Array], jax.Array]] = Registry("activation")
ACTIVATIONS.add("gelu", functools.partial(jax.nn.gelu, approximate=False))
ACTIVATIONS.add("gelu_tanh", functools.partial(jax.nn.gelu, approximate=True))
ACTIVATIONS.add("relu", jax.nn.relu)
ACTIVATIONS.add("silu", jax.nn.silu)

MLPS: Registry[type[nn.Module]] = Registry("mlp")


def _dense(cfg: ModelConfig, features: int, kernel_axes: tuple[str, str], std: float, name: str) -> nn.Dense:
    return nn.Dense(
        features, use_bias=cfg.use_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(std), kernel_axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, kernel_axes[1:]), name=name)


def gated_mlp(name: str) -> bool:
    """Whether model.mlp=`name` has a gate projection (three matrices: the FLOP count and converters read it)."""
    return issubclass(getattr(MLPS.get(name), "func", MLPS.get(name)), GatedMlp)


@MLPS.register("standard")
class Mlp(nn.Module):
    """d_model -> d_ff -> activation -> d_model; `activation` (None = model.activation) fixes it."""

    config: ModelConfig
    activation: str | None = None

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        cfg = self.config
        act = ACTIVATIONS.get(self.activation or cfg.activation)
        h_BTF = _dense(cfg, cfg.d_ff, ("embed", "mlp"), cfg.init_std, "up")(x_BTD)
        h_BTF = nn.with_logical_constraint(act(h_BTF), ("batch", "seq", "act_mlp"))
        return _dense(cfg, cfg.d_model, ("mlp", "embed"), cfg.residual_init_std, "down")(h_BTF)


@MLPS.register("gated")
class GatedMlp(nn.Module):
    """GLU variant (SwiGLU with activation=silu, GeGLU with gelu): act(x W_gate) * (x W_up) W_down;
    `activation` (None = model.activation) fixes it."""

    config: ModelConfig
    activation: str | None = None

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        cfg = self.config
        act = ACTIVATIONS.get(self.activation or cfg.activation)
        gate_BTF = act(_dense(cfg, cfg.d_ff, ("embed", "mlp"), cfg.init_std, "gate")(x_BTD))
        up_BTF = _dense(cfg, cfg.d_ff, ("embed", "mlp"), cfg.init_std, "up")(x_BTD)
        h_BTF = nn.with_logical_constraint(gate_BTF * up_BTF, ("batch", "seq", "act_mlp"))
        return _dense(cfg, cfg.d_model, ("mlp", "embed"), cfg.residual_init_std, "down")(h_BTF)


MLPS.add("gelu", functools.partial(Mlp, activation="gelu"))
MLPS.add("relu", functools.partial(Mlp, activation="relu"))
MLPS.add("swiglu", functools.partial(GatedMlp, activation="silu"))
MLPS.add("geglu", functools.partial(GatedMlp, activation="gelu"))
