"""Token and token-type embeddings over padded tables, and the masking of padded vocabulary logits."""

from __future__ import annotations

import flax.linen as nn
import jax
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

    def __call__(self, tokens_BT: jax.Array) -> jax.Array:
        return jnp.take(self.embedding, tokens_BT, axis=0).astype(self.config.dtype)

    def attend(self, x_BTD: jax.Array) -> jax.Array:
        """Logits against the embedding table (tied output head)."""
        cfg = self.config
        return jnp.einsum("btd,vd->btv", x_BTD, self.embedding.astype(cfg.dtype))


class TokenTypeEmbedding(nn.Module):
    """A (type_vocab_size, d_model) table of sentence-A/B embeddings (BERT's token_type_ids)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, token_types_BT: jax.Array) -> jax.Array:
        cfg = self.config
        table_YD = self.param("embedding", nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std),
                                                                        (None, "embed")),
                              (cfg.type_vocab_size, cfg.d_model), cfg.param_dtype)
        return jnp.take(table_YD, token_types_BT, axis=0).astype(cfg.dtype)


def mask_padded_vocab(logits_BTV: jax.Array, vocab_size: int) -> jax.Array:
    """Sets the logits of padding rows to the dtype's minimum so they get zero probability."""
    valid_V = jnp.arange(logits_BTV.shape[-1]) < vocab_size
    return jnp.where(valid_V, logits_BTV, jnp.finfo(logits_BTV.dtype).min)
