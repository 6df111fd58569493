"""Multi-head (and grouped-query) attention through jax.nn.dot_product_attention, for every family.

The mask comes from (query segment ids, key segment ids, causal or not): the same module is causal
self-attention in a decoder, bidirectional self-attention in an encoder, and cross-attention when the keys
come from another sequence. Position schemes may rotate queries and keys or add a bias to the logits
(`models.positions`).
"""

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
    def __call__(self, x: jax.Array) -> jax.Array:
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


def attention_mask(q_segments_BT: jax.Array | None, k_segments_BS: jax.Array | None,
                   causal: bool) -> jax.Array | None:
    """[B, 1, T, S] True where query t may read key s; causality itself is left to dot_product_attention.

    Segment id 0 marks padding. A query reads keys of its own segment. Without causality (encoders,
    cross-attention) no query reads a padding key, and a padding query reads every real key, as BERT
    does, so padding outputs are finite and equal transformers'. (The causal mask keeps padding with
    padding: the decoder's program is unchanged, and padding targets carry no weight.)
    """
    if q_segments_BT is None or k_segments_BS is None:
        return None
    same_BTS = q_segments_BT[:, :, None] == k_segments_BS[:, None, :]
    if not causal:
        real_key_B1S = k_segments_BS[:, None, :] != 0
        same_BTS = (same_BTS | (q_segments_BT[:, :, None] == 0)) & real_key_B1S
    return same_BTS[:, None, :, :]


class MultiHeadAttention(nn.Module):
    """q from `x_BTD`, k/v from `kv_BSD` (self-attention when it is x), optional rotary positions and
    additive bias, masked softmax attention, output projection."""

    config: ModelConfig
    causal: bool

    @nn.compact
    def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array, segment_ids_BT: jax.Array | None = None, *,
                 kv_BSD: jax.Array | None = None, kv_positions_BS: jax.Array | None = None,
                 kv_segment_ids_BS: jax.Array | None = None, bias_BNTS: jax.Array | None = None) -> jax.Array:
        cfg = self.config
        N, K, H, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_model
        self_attention = kv_BSD is None
        if self_attention:
            kv_BSD, kv_positions_BS, kv_segment_ids_BS = x_BTD, positions_BT, segment_ids_BT
        q_BTNH = Projection(cfg, "btd,dnh->btnh", (D, N, H), ("embed", "heads", "head_dim"), cfg.init_std, 2,
                            name="query")(x_BTD)
        k_BSKH = Projection(cfg, "bsd,dkh->bskh", (D, K, H), ("embed", "kv_heads", "head_dim"), cfg.init_std, 2,
                            name="key")(kv_BSD)
        v_BSKH = Projection(cfg, "bsd,dkh->bskh", (D, K, H), ("embed", "kv_heads", "head_dim"), cfg.init_std, 2,
                            name="value")(kv_BSD)
        rotate = POSITIONALS.get(cfg.positional).rotate_qk
        if rotate is not None and self_attention:
            q_BTNH = rotate(q_BTNH, positions_BT, cfg.rope_base)
            k_BSKH = rotate(k_BSKH, kv_positions_BS, cfg.rope_base)
        q_BTNH = nn.with_logical_constraint(q_BTNH, ("batch", "seq", "act_heads", None))
        k_BSKH = nn.with_logical_constraint(k_BSKH, ("batch", "seq", "act_kv_heads", None))
        v_BSKH = nn.with_logical_constraint(v_BSKH, ("batch", "seq", "act_kv_heads", None))
        mask_B1TS = attention_mask(segment_ids_BT, kv_segment_ids_BS, self.causal)
        out_BTNH = jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, bias=bias_BNTS, mask=mask_B1TS,
                                                is_causal=self.causal)
        out_BTNH = nn.with_logical_constraint(out_BTNH, ("batch", "seq", "act_heads", None))
        return Projection(cfg, "btnh,nhd->btd", (N, H, D), ("heads", "head_dim", "embed"), cfg.residual_init_std,
                          1, name="out")(out_BTNH)
