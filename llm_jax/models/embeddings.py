"""Token and token-type embeddings over padded tables, and the masking of padded vocabulary logits."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_jax.models.model_config import ModelConfig

ACTIVATION_AXES = ("batch", "seq", "act_embed")  # the residual stream [B, T, D]


def _sharded_axes(logical: str, sizes: dict[str, int]) -> set[str]:
    """The mesh axes of size > 1 that a logical axis name is sharded over under the active rules."""
    axes = nn.logical_to_mesh_axes((logical,))[0]
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return {axis for axis in axes if sizes.get(axis, 1) > 1}


def lookup(table_VD: jax.Array, ids_BT: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """Rows of an embedding table for a batch of ids, [B, T, D], sharded like the residual stream.

    The gather's output takes the table's column (`embed`) sharding. When the batch is split only over those
    same mesh axes (fsdp alone) XLA moves it to the batch sharding with an all-to-all; when the batch is also
    split over other axes (data x fsdp), XLA's partitioner cannot, and fully rematerialises (replicates on every
    device) the [B, T, D] activation, forward and backward. Only then the table's columns are gathered first,
    as FSDP does for every weight it uses, so the output takes the ids' batch sharding (the cost: the table's
    full columns and their gradient on each device during the step).
    """
    sizes = dict(jax.sharding.get_abstract_mesh().shape)
    embed_axes, batch_axes = _sharded_axes("embed", sizes), _sharded_axes("batch", sizes)
    if embed_axes & batch_axes and batch_axes - embed_axes:
        table_VD = nn.with_logical_constraint(table_VD, ("vocab", None))
    return nn.with_logical_constraint(jnp.take(table_VD, ids_BT, axis=0).astype(dtype), ACTIVATION_AXES)


class TokenEmbedding(nn.Module):
    """A (padded_vocab, d_model) table; rows past vocab_size exist only so the mesh axes sharding the vocabulary
    divide it."""

    config: ModelConfig

    def setup(self) -> None:
        cfg = self.config
        self.embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(cfg.embedding_init_std or cfg.init_std),
                                         ("vocab", "embed")),
            (cfg.padded_vocab_size, cfg.d_model), cfg.param_dtype)

    def __call__(self, tokens_BT: jax.Array) -> jax.Array:
        return lookup(self.embedding, tokens_BT, self.config.dtype)

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
        return lookup(table_YD, token_types_BT, cfg.dtype)


def mask_padded_vocab(logits_BTV: jax.Array, vocab_size: int) -> jax.Array:
    """Sets the logits of padding rows to the dtype's minimum so they get zero probability."""
    valid_V = jnp.arange(logits_BTV.shape[-1]) < vocab_size
    return jnp.where(valid_V, logits_BTV, jnp.finfo(logits_BTV.dtype).min)
