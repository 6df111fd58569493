"""llm_jax: Transformer language models in JAX/Flax, trained sharded over a jax.sharding mesh."""

from llm_jax import xla_defaults as _xla_defaults

_xla_defaults.apply()
