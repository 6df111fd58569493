"""T5's relative position bias (Raffel et al. 2020): a learned scalar per head and relative-distance bucket,
added to the attention logits; exact buckets for small distances, logarithmic ones up to a maximum distance.
One table per stack, shared by its layers (as T5 does); bidirectional stacks (encoders) bucket each sign
separately, causal ones only the past. Extrapolates: every distance past `relative_attention_max_distance`
shares the last bucket."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.models.model_config import ModelConfig, component_key
from llm_jax.models.positions import POSITIONALS, PositionalScheme, key_positions

component_key("relative_attention_num_buckets", 32, "relative-distance buckets of positional=t5_relative_bias")
component_key("relative_attention_max_distance", 128, "distance at which positional=t5_relative_bias buckets stop "
                                                       "growing (longer distances share the last bucket)")


def relative_position_bucket(relative_BTS: jax.Array, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> jax.Array:
    """Bucket of each key-minus-query distance: the first half of the buckets (per sign when bidirectional)
    are exact distances, the rest grow logarithmically up to `max_distance`."""
    buckets_BTS = jnp.zeros_like(relative_BTS)
    if bidirectional:
        num_buckets //= 2
        buckets_BTS = buckets_BTS + (relative_BTS > 0).astype(relative_BTS.dtype) * num_buckets
        distance_BTS = jnp.abs(relative_BTS)
    else:
        distance_BTS = -jnp.minimum(relative_BTS, 0)
    max_exact = num_buckets // 2
    log_ratio_BTS = (jnp.log(jnp.maximum(distance_BTS, 1).astype(jnp.float32) / max_exact)
                     / np.log(max_distance / max_exact))
    large_BTS = max_exact + (log_ratio_BTS * (num_buckets - max_exact)).astype(relative_BTS.dtype)
    large_BTS = jnp.minimum(large_BTS, num_buckets - 1)
    return buckets_BTS + jnp.where(distance_BTS < max_exact, distance_BTS, large_BTS)


class T5RelativeBias(nn.Module):
    """(q_positions_BT) -> bias_BNTS from a (buckets, heads) table."""

    config: ModelConfig
    causal: bool = True

    @nn.compact
    def __call__(self, q_positions_BT: jax.Array) -> jax.Array:
        cfg = self.config
        k_positions_BS = key_positions(self, q_positions_BT, self.causal)
        table_RN = self.param("rel_embedding",
                              nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std),
                                                           ("relpos_buckets", "heads")),
                              (cfg.relative_attention_num_buckets, cfg.num_heads), cfg.param_dtype)
        relative_BTS = (k_positions_BS[:, None, :] - q_positions_BT[:, :, None]).astype(jnp.int32)
        buckets_BTS = relative_position_bucket(relative_BTS, not self.causal, cfg.relative_attention_num_buckets,
                                               cfg.relative_attention_max_distance)
        bias_BTSN = jnp.take(table_RN.astype(cfg.dtype), buckets_BTS, axis=0)
        return jnp.transpose(bias_BTSN, (0, 3, 1, 2))


POSITIONALS.add("t5_relative_bias", PositionalScheme(None, None, T5RelativeBias))
