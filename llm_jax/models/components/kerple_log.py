"""KERPLE-log (Chi et al. 2022, "KERPLE: Kernelized Relative Positional Embedding for Length
Extrapolation"): head n adds -r1_n * log(1 + r2_n * |t - s|) to the logit of query t and key s, with r1, r2 > 0
learned per head. The worked example of docs/extending.md: one file, one registration, its own key."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_jax.models.model_config import ModelConfig, component_key
from llm_jax.models.positions import POSITIONALS, PositionalScheme, key_positions

component_key("kerple_init", 1.0, "initial r1 and r2 of every head (positional=kerple_log)")


class KerpleLogBias(nn.Module):
    """(q_positions_BT) -> bias_BNTS = -r1 * log(1 + r2 * distance), r = softplus(raw) keeps both positive."""

    config: ModelConfig
    causal: bool = True

    @nn.compact
    def __call__(self, q_positions_BT: jax.Array) -> jax.Array:
        cfg = self.config
        k_positions_BS = key_positions(self, q_positions_BT, self.causal)
        raw_init = jnp.log(jnp.expm1(cfg.kerple_init))  # softplus(raw_init) == kerple_init
        init = lambda key, shape, dtype: jnp.full(shape, raw_init, dtype)  # noqa: E731
        raw_r1_N = self.param("raw_r1", nn.with_logical_partitioning(init, ("heads",)), (cfg.num_heads,),
                              cfg.param_dtype)
        raw_r2_N = self.param("raw_r2", nn.with_logical_partitioning(init, ("heads",)), (cfg.num_heads,),
                              cfg.param_dtype)
        r1_N11, r2_N11 = (jax.nn.softplus(raw.astype(jnp.float32))[:, None, None] for raw in (raw_r1_N, raw_r2_N))
        distance_B1TS = jnp.abs(q_positions_BT[:, :, None] - k_positions_BS[:, None, :])[:, None].astype(jnp.float32)
        return (-r1_N11 * jnp.log1p(r2_N11 * distance_B1TS)).astype(cfg.dtype)


POSITIONALS.add("kerple_log", PositionalScheme(None, None, KerpleLogBias))
