"""The Transformer block of every family: self-attention, optional cross-attention, MLP, each a residual
branch with dropout, normalised pre-LN (x + f(norm(x)), GPT-2) or post-LN (norm(x + f(x)), BERT)."""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name

from llm_jax.models.attention import MultiHeadAttention
from llm_jax.models.cpu_tuning import residual_barrier
from llm_jax.models.embeddings import ACTIVATION_AXES
from llm_jax.models.mlp import MLPS
from llm_jax.models.model_config import ModelConfig
from llm_jax.models.norms import NORMS
from llm_jax.models.remat import ATTENTION_OUT, CROSS_ATTENTION_OUT, MLP_OUT
from llm_jax.registry import Registry



# (x, branch function, norm module, dropout) -> new residual stream
Residual = Callable[[jax.Array, Callable[[jax.Array], jax.Array], nn.Module, Callable[[jax.Array], jax.Array]],
                    jax.Array]
NORM_POSITIONS: Registry[Residual] = Registry("norm position")


@NORM_POSITIONS.register("pre")
def pre_norm_residual(x_BTD, branch, norm, dropout):
    """x + dropout(f(norm(x))): the stream itself is never normalised (GPT-2, LLaMA)."""
    return x_BTD + dropout(branch(norm(x_BTD)))


@NORM_POSITIONS.register("post")
def post_norm_residual(x_BTD, branch, norm, dropout):
    """norm(x + dropout(f(x))): the original Transformer and BERT."""
    return norm(x_BTD + dropout(branch(x_BTD)))


class Block(nn.Module):
    """One block; `causal` selects the self-attention mask, `cross` adds attention over an encoder output;
    `prefix_BT` (model.attention_mask=prefix_lm) goes to self-attention only."""

    config: ModelConfig
    causal: bool
    cross: bool = False

    @nn.compact
    def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array, segment_ids_BT: jax.Array | None,
                 deterministic: bool, *, bias_BNTS: jax.Array | None = None, encoded_BSD: jax.Array | None = None,
                 encoded_segment_ids_BS: jax.Array | None = None, prefix_BT: jax.Array | None = None) -> jax.Array:
        cfg = self.config
        norm = NORMS.get(cfg.norm)
        materialize_cotangent = residual_barrier(cfg.cpu_tuning)
        residual = NORM_POSITIONS.get(cfg.norm_position)

        def dropout(y_BTD: jax.Array) -> jax.Array:
            return nn.Dropout(cfg.dropout)(y_BTD, deterministic=deterministic)

        def self_attention(h_BTD: jax.Array) -> jax.Array:
            out_BTD = MultiHeadAttention(cfg, self.causal, name="attention")(h_BTD, positions_BT, segment_ids_BT,
                                                                             bias_BNTS=bias_BNTS, prefix_BT=prefix_BT)
            return checkpoint_name(out_BTD, ATTENTION_OUT)  # what model.remat=save_names keeps

        x_BTD = materialize_cotangent(x_BTD)
        x_BTD = residual(x_BTD, self_attention, norm(cfg, name="attention_norm"), dropout)
        x_BTD = materialize_cotangent(nn.with_logical_constraint(x_BTD, ACTIVATION_AXES))
        if self.cross:
            def cross_attention(h_BTD: jax.Array) -> jax.Array:
                return checkpoint_name(MultiHeadAttention(cfg, False, cross=True, name="cross_attention")(
                    h_BTD, positions_BT, segment_ids_BT, kv_BSD=encoded_BSD, kv_segment_ids_BS=encoded_segment_ids_BS),
                    CROSS_ATTENTION_OUT)

            x_BTD = residual(x_BTD, cross_attention, norm(cfg, name="cross_attention_norm"), dropout)
            x_BTD = materialize_cotangent(nn.with_logical_constraint(x_BTD, ACTIVATION_AXES))
        mlp = MLPS.get(cfg.mlp)(cfg, name="mlp")
        x_BTD = residual(x_BTD, lambda h_BTD: checkpoint_name(mlp(h_BTD), MLP_OUT), norm(cfg, name="mlp_norm"),
                         dropout)
        return nn.with_logical_constraint(x_BTD, ACTIVATION_AXES)
