"""Multi-head (and grouped-query) attention for every family; the kernel is `model.attention_impl`
(`models.attention_kernels`: xla, cudnn, splash).

The mask comes from (query segment ids, key segment ids, causal or not): the same module is causal
self-attention in a decoder, bidirectional self-attention in an encoder, and cross-attention when the keys
come from another sequence. Position schemes may rotate queries and keys or add a bias to the logits
(`models.positions`).

Decoding (`llm_jax.decoding.engine`) runs self-attention with a mutable Flax "cache" collection: each layer
keeps `cached_key` [B, K, H, S] and `cached_value` [B, K, S, H] for S cache slots, a token's keys are written
at the slot equal to its position (rows are right-padded, so position == slot), and queries read every slot at
or before their own position (under model.attention_mask=prefix_lm, a prefill's prompt queries also read the
prompt's later slots). Without a mutable cache the program is the training program, unchanged.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_jax.models.attention_kernels import ATTENTION_KERNELS, attention_mask  # noqa: F401 (re-exported)
from llm_jax.models.attention_masks import prefix_visible
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
    cross: bool = False  # keys and values from `kv_BSD` (an encoder's output), no positional encoding

    @nn.compact
    def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array, segment_ids_BT: jax.Array | None = None, *,
                 kv_BSD: jax.Array | None = None, kv_segment_ids_BS: jax.Array | None = None,
                 bias_BNTS: jax.Array | None = None, prefix_BT: jax.Array | None = None) -> jax.Array:
        """`prefix_BT` (self-attention under model.attention_mask=prefix_lm; None otherwise): 1 on prefix tokens,
        which read the whole prefix of their segment (`models.attention_masks`)."""
        cfg = self.config
        N, H, D = cfg.num_heads, cfg.head_dim, cfg.d_model
        self_attention = not self.cross
        q_BTNH = Projection(cfg, "btd,dnh->btnh", (D, N, H), ("embed", "heads", "head_dim"), cfg.init_std, 2,
                            name="query")(x_BTD)
        if self_attention:
            k_BSKH, v_BSKH = self._keys_values(x_BTD)
            kv_segment_ids_BS = segment_ids_BT
        else:
            k_BSKH, v_BSKH, kv_segment_ids_BS = self._cross_keys_values(kv_BSD, kv_segment_ids_BS)
            if segment_ids_BT is None:  # unpacked decoder rows: every query reads the real encoder positions
                segment_ids_BT = jnp.ones(x_BTD.shape[:2], jnp.int32)
        rotate = POSITIONALS.get(cfg.positional).rotate_qk
        if rotate is not None and self_attention:
            q_BTNH = rotate(q_BTNH, positions_BT, cfg)
            k_BSKH = rotate(k_BSKH, positions_BT, cfg)
        if not cfg.scale_attention_logits:  # every kernel divides by sqrt(H): T5's logits are unscaled
            q_BTNH = q_BTNH * jnp.asarray(H ** 0.5, q_BTNH.dtype)
        q_BTNH = nn.with_logical_constraint(q_BTNH, ("batch", "seq", "act_heads", None))
        if self_attention and self.causal and self.is_mutable_collection("cache"):
            out_BTNH = self._cached_attend(q_BTNH, k_BSKH, v_BSKH, positions_BT, bias_BNTS, prefix_BT)
            return Projection(cfg, "btnh,nhd->btd", (N, H, D), ("heads", "head_dim", "embed"), cfg.residual_init_std,
                              1, name="out")(out_BTNH)
        k_BSKH = nn.with_logical_constraint(k_BSKH, ("batch", "seq", "act_kv_heads", None))
        v_BSKH = nn.with_logical_constraint(v_BSKH, ("batch", "seq", "act_kv_heads", None))
        attend = ATTENTION_KERNELS.get(cfg.attention_impl).attend
        prefix = {} if prefix_BT is None else {"q_prefix_BT": prefix_BT, "k_prefix_BS": prefix_BT}
        out_BTNH = attend(q_BTNH, k_BSKH, v_BSKH, q_segments_BT=segment_ids_BT, k_segments_BS=kv_segment_ids_BS,
                          causal=self.causal, bias_BNTS=bias_BNTS, **prefix)
        out_BTNH = nn.with_logical_constraint(out_BTNH, ("batch", "seq", "act_heads", None))
        return Projection(cfg, "btnh,nhd->btd", (N, H, D), ("heads", "head_dim", "embed"), cfg.residual_init_std,
                          1, name="out")(out_BTNH)

    def _keys_values(self, kv_BSD: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        K, H, D = cfg.num_kv_heads, cfg.head_dim, cfg.d_model
        return tuple(Projection(cfg, "bsd,dkh->bskh", (D, K, H), ("embed", "kv_heads", "head_dim"), cfg.init_std, 2,
                                name=name)(kv_BSD) for name in ("key", "value"))

    def _cross_keys_values(self, kv_BSD: jax.Array | None, kv_segment_ids_BS: jax.Array | None
                           ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
        """Cross-attention keys, values and key segment ids. While decoding (a mutable cache) the call that
        gets the encoder output (prefill) projects it once and caches the three; later steps (kv_BSD=None)
        read them from the cache."""
        if kv_BSD is not None:
            k_BSKH, v_BSKH = self._keys_values(kv_BSD)
            if self.is_mutable_collection("cache"):
                segments_BS = (jnp.ones(kv_BSD.shape[:2], jnp.int32) if kv_segment_ids_BS is None
                               else kv_segment_ids_BS.astype(jnp.int32))
                for name, value in (("cross_key", k_BSKH), ("cross_value", v_BSKH), ("cross_segments", segments_BS)):
                    self.put_variable("cache", name, value)
            return k_BSKH, v_BSKH, kv_segment_ids_BS
        if not self.has_variable("cache", "cross_key"):
            raise ValueError("cross-attention without encoder outputs: pass encoded_BSD, or prefill the cache first")
        return tuple(self.get_variable("cache", name) for name in ("cross_key", "cross_value", "cross_segments"))

    def _cached_attend(self, q_BTNH: jax.Array, k_BTKH: jax.Array, v_BTKH: jax.Array,
                       positions_BT: jax.Array, bias_BNTS: jax.Array | None,
                       prefix_BT: jax.Array | None = None) -> jax.Array:
        """Writes this call's keys/values into the cache at their positions and attends over the cache slots at
        or before each query's position; with `prefix_BT` (a prefix LM's prefill: the prompt), prefix queries
        also read the slots this call wrote for prefix tokens. Decode steps pass none: their queries follow
        the prompt, so they read all of it anyway.

        Keys are cached as [B, K, H, S] and values as [B, K, S, H]: the fastest of the layouts measured on
        XLA:CPU (benchmarks/decode_latency.py: 2.1 ms/token at 1280 slots, against 3.0 with
        jax.nn.dot_product_attention over [B, S, K, H], which made XLA transpose the whole cache every step).
        The first call, when the cache does not exist yet, creates it with T slots: the engine traces the model
        once with a [B, S] input under jax.eval_shape to get the cache's shapes."""
        B, T, K, H = k_BTKH.shape
        cached_k = self.variable("cache", "cached_key", jnp.zeros, (B, K, H, T), k_BTKH.dtype)
        cached_v = self.variable("cache", "cached_value", jnp.zeros, (B, K, T, H), v_BTKH.dtype)
        S = cached_v.value.shape[2]
        rows_B1 = jnp.arange(B)[:, None]
        # advanced indices split by slices: the update's axes are (B, T) then the sliced ones, (K, H)
        cached_k.value = cached_k.value.at[rows_B1, :, :, positions_BT].set(k_BTKH.astype(cached_k.value.dtype),
                                                                         mode="drop")
        cached_v.value = cached_v.value.at[rows_B1, :, positions_BT].set(v_BTKH.astype(cached_v.value.dtype),
                                                                         mode="drop")
        G = q_BTNH.shape[2] // K  # query heads per key/value head
        q_BTKGH = q_BTNH.reshape(B, T, K, G, H)
        logits_BKGTS = jnp.einsum("btkgh,bkhs->bkgts", q_BTKGH, cached_k.value,
                                  preferred_element_type=jnp.float32) * (H ** -0.5)
        slots_S = jnp.arange(S)
        if bias_BNTS is not None:  # the stack computed it against every cache slot (positions.key_positions)
            logits_BKGTS = logits_BKGTS + bias_BNTS.reshape(B, K, G, T, S).astype(jnp.float32)
        visible_BTS = slots_S[None, None, :] <= positions_BT[:, :, None]
        if prefix_BT is not None:  # slot == position: the prefix flags of this call's keys, at their slots
            slot_prefix_BS = jnp.zeros((B, S), bool).at[rows_B1, positions_BT].set(prefix_BT.astype(bool), mode="drop")
            visible_BTS = prefix_visible(prefix_BT, slot_prefix_BS, visible_BTS)
        visible_B11TS = visible_BTS[:, None, None]
        logits_BKGTS = jnp.where(visible_B11TS, logits_BKGTS, jnp.finfo(jnp.float32).min)
        probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1).astype(cached_v.value.dtype)
        out_BTKGH = jnp.einsum("bkgts,bksh->btkgh", probs_BKGTS, cached_v.value)
        return out_BTKGH.reshape(B, T, K * G, H).astype(q_BTNH.dtype)
