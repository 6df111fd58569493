"""Token embedding over a padded vocabulary, and the output projection (tied or not)."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from llm_jax.models.model_config import ModelConfig


class TokenEmbedding(nn.Module):
    """A (padded_vocab, d_model) table; rows past vocab_size exist only so every mesh axis divides it."""

    config: ModelConfig

    def setup(self) -> None:
        cfg = self.config
        self.embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), ("vocab", "embed")),
            (cfg.padded_vocab_size, cfg.d_model), cfg.param_dtype)

    def __call__(self, tokens_BT: jnp.ndarray) -> jnp.ndarray:
        return jnp.take(self.embedding, tokens_BT, axis=0).astype(self.config.dtype)

    def attend(self, x_BTD: jnp.ndarray) -> jnp.ndarray:
        """Logits against the embedding table (tied output head)."""
        cfg = self.config
        return jnp.einsum("btd,vd->btv", x_BTD, self.embedding.astype(cfg.dtype))


class OutputHead(nn.Module):
    """Untied (d_model, padded_vocab) projection to logits."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: jnp.ndarray) -> jnp.ndarray:
        cfg = self.config
        return nn.Dense(
            cfg.padded_vocab_size, use_bias=cfg.use_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
            kernel_init=nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), ("embed", "vocab")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
            name="dense")(x_BTD)


def mask_padded_vocab(logits_BTV: jnp.ndarray, vocab_size: int) -> jnp.ndarray:
    """Sets the logits of padding rows to the dtype's minimum so they get zero probability."""
    valid_V = jnp.arange(logits_BTV.shape[-1]) < vocab_size
    return jnp.where(valid_V, logits_BTV, jnp.finfo(logits_BTV.dtype).min)
