"""The pre-LN Transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from llm_jax.models.attention import CausalSelfAttention
from llm_jax.models.mlp import MLPS
from llm_jax.models.model_config import ModelConfig
from llm_jax.models.norms import NORMS

ACTIVATION_AXES = ("batch", "seq", "act_embed")


class DecoderBlock(nn.Module):
    """One causal block with dropout on each residual branch."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: jnp.ndarray, positions_BT: jnp.ndarray, segment_ids_BT: jnp.ndarray | None,
                 deterministic: bool) -> jnp.ndarray:
        cfg = self.config
        norm = NORMS.get(cfg.norm)
        attn_BTD = CausalSelfAttention(cfg, name="attention")(norm(cfg, name="attention_norm")(x_BTD),
                                                              positions_BT, segment_ids_BT)
        x_BTD = x_BTD + nn.Dropout(cfg.dropout)(attn_BTD, deterministic=deterministic)
        x_BTD = nn.with_logical_constraint(x_BTD, ACTIVATION_AXES)
        mlp_BTD = MLPS.get(cfg.mlp)(cfg, name="mlp")(norm(cfg, name="mlp_norm")(x_BTD))
        x_BTD = x_BTD + nn.Dropout(cfg.dropout)(mlp_BTD, deterministic=deterministic)
        return nn.with_logical_constraint(x_BTD, ACTIVATION_AXES)
