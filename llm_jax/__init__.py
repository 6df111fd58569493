"""llm_jax: Transformer language models in JAX/Flax, trained sharded over a jax.sharding mesh."""

from llm_jax import xla_defaults as _xla_defaults

_xla_defaults.apply()


def __getattr__(name: str):
    """`llm_jax.load(DIR)` without importing the model code when the package is imported."""
    if name == "load":
        from llm_jax.api import load

        return load
    raise AttributeError(f"module 'llm_jax' has no attribute {name!r}")
