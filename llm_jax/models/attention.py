"""Multi-head (and grouped-query) attention for every family; the kernel is `model.attention_impl`
(`models.attention_kernels`: xla, cudnn, splash).

The mask comes from (query segment ids, key segment ids, causal or not): the same module is causal
self-attention in a decoder, bidirectional self-attention in an encoder, and cross-attention when the keys
come from another sequence. Position schemes may rotate queries and keys or add a bias to the logits
(`models.positions`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_jax.models.attention_kernels import ATTENTION_KERNELS, attention_mask  # noqa: F401 (re-exported)
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


class MultiHeadAttention(nn.Module):
    """q from `x_BTD`, k/v from `kv_BSD` (self-attention when it is x), optional rotary positions and
    additive bias, masked softmax attention by the `model.attention_impl` kernel, output projection."""

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
        attend = ATTENTION_KERNELS.get(cfg.attention_impl).attend
        out_BTNH = attend(q_BTNH, k_BSKH, v_BSKH, q_segments_BT=segment_ids_BT, k_segments_BS=kv_segment_ids_BS,
                          causal=self.causal, bias_BNTS=bias_BNTS)
        out_BTNH = nn.with_logical_constraint(out_BTNH, ("batch", "seq", "act_heads", None))
        return Projection(cfg, "btnh,nhd->btd", (N, H, D), ("heads", "head_dim", "embed"), cfg.residual_init_std,
                          1, name="out")(out_BTNH)
