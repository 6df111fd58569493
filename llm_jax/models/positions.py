"""Position encodings, selected by `model.positional`.

A scheme adds a vector to the token embeddings (learned, sinusoidal), rotates queries and keys inside
attention (rope), adds a bias to the attention logits (alibi here; T5's relative buckets in
llm_jax/models/components/t5_relative_bias.py), or does nothing (none). Self-attention only: cross-attention
(encoder-decoder) takes no positional encoding, its keys are the encoder's outputs.

A new scheme is one file in llm_jax/models/components/ that registers a PositionalScheme here and declares its
own hyperparameters with `model_config.component_key` (docs/extending.md walks through one).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.models.embeddings import lookup
from llm_jax.models.model_config import ModelConfig, component_key
from llm_jax.registry import Registry

component_key("rope_base", 10000.0, "rotary base frequency (positional=rope)")


class LearnedPositions(nn.Module):
    """A trained (max_len, d_model) table, GPT-2 style."""

    config: ModelConfig

    @nn.compact
    def __call__(self, positions_BT: jax.Array) -> jax.Array:
        cfg = self.config
        table_LD = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), ("positions", "embed")),
            (cfg.max_len, cfg.d_model), cfg.param_dtype)
        return lookup(table_LD, positions_BT, cfg.dtype)


class SinusoidalPositions(nn.Module):
    """The fixed sin/cos encoding of "Attention Is All You Need"; no parameters."""

    config: ModelConfig

    def __call__(self, positions_BT: jax.Array) -> jax.Array:
        d_model = self.config.d_model
        inv_freq_R = 1.0 / (10000.0 ** (np.arange(0, d_model, 2, dtype=np.float32) / d_model))
        angles_BTR = positions_BT[..., None].astype(jnp.float32) * inv_freq_R
        encoding_BTD = jnp.zeros(positions_BT.shape + (d_model,), jnp.float32)
        encoding_BTD = encoding_BTD.at[..., 0::2].set(jnp.sin(angles_BTR))
        encoding_BTD = encoding_BTD.at[..., 1::2].set(jnp.cos(angles_BTR[..., : d_model // 2]))
        return encoding_BTD.astype(self.config.dtype)


def apply_rope(x_BTNH: jax.Array, positions_BT: jax.Array, base: float) -> jax.Array:
    """Rotates pairs (i, i + H/2) of each head by position-dependent angles (GPT-NeoX/LLaMA layout)."""
    head_dim = x_BTNH.shape[-1]
    inv_freq_R = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    angles_BTR = positions_BT[..., None].astype(jnp.float32) * inv_freq_R
    sin_BT1R, cos_BT1R = jnp.sin(angles_BTR)[:, :, None, :], jnp.cos(angles_BTR)[:, :, None, :]
    x1_BTNR, x2_BTNR = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
    rotated_BTNH = jnp.concatenate([x1_BTNR * cos_BT1R - x2_BTNR * sin_BT1R,
                                    x2_BTNR * cos_BT1R + x1_BTNR * sin_BT1R], axis=-1)
    return rotated_BTNH.astype(x_BTNH.dtype)


def key_positions(module: nn.Module, q_positions_BT: jax.Array, causal: bool) -> jax.Array:
    """The key positions a self-attention bias is computed against: the queries' own positions, or, while a
    causal stack decodes with a cache (engine), every cache slot (slot == position), whose count the first
    (shape-tracing) call records as the shape of a cache variable."""
    if not (causal and module.is_mutable_collection("cache")):
        return q_positions_BT
    # only the shape is read: the engine builds its empty cache as zeros of the traced shapes
    slots = module.variable("cache", "slot_positions", jnp.zeros, q_positions_BT.shape, jnp.int32)  # [B, S]
    return jnp.broadcast_to(jnp.arange(slots.value.shape[1]), slots.value.shape)


class AlibiBias(nn.Module):
    """ALiBi (Press et al. 2022): head n adds -slope_n * |t - s| to the logit of query t and key s; no
    parameters. Causal models only ever see s <= t, where this is the paper's linear penalty."""

    config: ModelConfig
    causal: bool = True

    @nn.compact
    def __call__(self, q_positions_BT: jax.Array) -> jax.Array:
        num_heads = self.config.num_heads
        k_positions_BS = key_positions(self, q_positions_BT, self.causal)
        slopes_N = 2.0 ** (-8.0 * np.arange(1, num_heads + 1, dtype=np.float32) / num_heads)
        distance_BTS = jnp.abs(q_positions_BT[:, :, None] - k_positions_BS[:, None, :]).astype(jnp.float32)
        return (-slopes_N[None, :, None, None] * distance_BTS[:, None]).astype(self.config.dtype)


@dataclasses.dataclass(frozen=True)
class PositionalScheme:
    """How one encoding enters the model: an additive embedding module `embedding(cfg)(positions_BT)`, a q/k
    rotation `rotate_qk(x_BTNH, positions_BT, cfg)`, and/or a bias module `attention_bias(cfg, causal)` called
    on the query positions, returning the additive self-attention bias [B, heads, T, S] that every layer of a
    stack shares (keys from `key_positions`). `extrapolates`: whether it is defined past model.max_len (a learned
    table is not; evaluate --seq_len scores such models with a sliding window)."""

    embedding: type[nn.Module] | None
    rotate_qk: Callable[[jax.Array, jax.Array, ModelConfig], jax.Array] | None
    attention_bias: type[nn.Module] | None = None
    extrapolates: bool = True


POSITIONALS: Registry[PositionalScheme] = Registry("positional encoding")
def rotate_rope(x_BTNH: jax.Array, positions_BT: jax.Array, cfg: ModelConfig) -> jax.Array:
    return apply_rope(x_BTNH, positions_BT, cfg.rope_base)


POSITIONALS.add("learned", PositionalScheme(LearnedPositions, None, extrapolates=False))
POSITIONALS.add("sinusoidal", PositionalScheme(SinusoidalPositions, None))
POSITIONALS.add("rope", PositionalScheme(None, rotate_rope))
POSITIONALS.add("none", PositionalScheme(None, None))
POSITIONALS.add("alibi", PositionalScheme(None, None, AlibiBias))
