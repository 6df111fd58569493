"""The pre-LN Transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_jax.models.attention import CausalSelfAttention
from llm_jax.models.mlp import MLPS
from llm_jax.models.model_config import ModelConfig
from llm_jax.models.norms import NORMS

ACTIVATION_AXES = ("batch", "seq", "act_embed")


@jax.custom_vjp
def materialize_cotangent(x: jnp.ndarray) -> jnp.ndarray:
    """Identity whose gradient is materialised (an optimization barrier on the cotangent).

    Without it XLA fuses the residual stream's gradient, a sum over every later layer, into each consumer
    and recomputes it there: backward cost grows with layers squared (measured on CPU: 4 layers took 6x
    the time of 1). The barrier makes each block boundary a materialised buffer.
    """
    return x


materialize_cotangent.defvjp(lambda x: (x, None), lambda _, g: (jax.lax.optimization_barrier(g),))


class DecoderBlock(nn.Module):
    """One causal block with dropout on each residual branch."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: jnp.ndarray, positions_BT: jnp.ndarray, segment_ids_BT: jnp.ndarray | None,
                 deterministic: bool) -> jnp.ndarray:
        cfg = self.config
        x_BTD = materialize_cotangent(x_BTD)
        norm = NORMS.get(cfg.norm)
        attn_BTD = CausalSelfAttention(cfg, name="attention")(norm(cfg, name="attention_norm")(x_BTD),
                                                              positions_BT, segment_ids_BT)
        x_BTD = x_BTD + nn.Dropout(cfg.dropout)(attn_BTD, deterministic=deterministic)
        x_BTD = materialize_cotangent(nn.with_logical_constraint(x_BTD, ACTIVATION_AXES))
        mlp_BTD = MLPS.get(cfg.mlp)(cfg, name="mlp")(norm(cfg, name="mlp_norm")(x_BTD))
        x_BTD = x_BTD + nn.Dropout(cfg.dropout)(mlp_BTD, deterministic=deterministic)
        return nn.with_logical_constraint(x_BTD, ACTIVATION_AXES)
