"""The parts every family composes: embeddings in, blocks, final norm; call inside a compact method.

These are functions, not modules, so their parameters sit at the top of the family's tree
(token_embedding, position_embedding, token_type_embedding, embedding_norm, block_{i} or, with
model.scan_layers, one stacked `blocks`, final_norm) and a family is a few lines: embed -> blocks -> heads.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_jax.models import layer_layout
from llm_jax.models.blocks import Block
from llm_jax.models.embeddings import ACTIVATION_AXES, TokenEmbedding, TokenTypeEmbedding
from llm_jax.models.model_config import ModelConfig
from llm_jax.models.norms import NORMS
from llm_jax.models.positions import POSITIONALS
from llm_jax.models.remat import remat_block


def positions_from_segments(segment_ids_BT: jax.Array | None, shape: tuple[int, int], *,
                            padding_continues: bool = False) -> jax.Array:
    """0, 1, 2, ... per row, restarting wherever the segment id changes (packed rows). With
    `padding_continues` (encoders), padding (segment 0) continues the count of the segment before it, as the
    positions of an unpacked padded BERT row do."""
    index_BT = jnp.broadcast_to(jnp.arange(shape[1]), shape)
    if segment_ids_BT is None:
        return index_BT
    changes_BT = segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]
    if padding_continues:
        changes_BT = changes_BT & (segment_ids_BT[:, 1:] != 0)
    starts_BT = jnp.concatenate([jnp.ones((shape[0], 1), bool), changes_BT], 1)
    return index_BT - jax.lax.cummax(jnp.where(starts_BT, index_BT, 0), axis=1)


def embed(cfg: ModelConfig, tokens_BT: jax.Array, positions_BT: jax.Array, token_types_BT: jax.Array | None,
          deterministic: bool, embedding: TokenEmbedding | None = None) -> tuple[jax.Array, TokenEmbedding]:
    """Token (+ position) (+ token-type) embeddings, optional norm, dropout; returns the embedding module too,
    for heads tied to it. `embedding`: a token embedding shared with another stack (encoder-decoder)."""
    if embedding is None:
        embedding = TokenEmbedding(cfg, name="token_embedding")
    x_BTD = embedding(tokens_BT)
    if cfg.scale_embeddings:
        x_BTD = x_BTD * jnp.asarray(cfg.d_model ** 0.5, x_BTD.dtype)
    position_module = POSITIONALS.get(cfg.positional).embedding
    if position_module is not None:
        x_BTD = x_BTD + position_module(cfg, name="position_embedding")(positions_BT)
    if cfg.type_vocab_size:
        if token_types_BT is None:
            token_types_BT = jnp.zeros_like(tokens_BT)
        x_BTD = x_BTD + TokenTypeEmbedding(cfg, name="token_type_embedding")(token_types_BT)
    if cfg.embedding_norm:
        x_BTD = NORMS.get(cfg.norm)(cfg, name="embedding_norm")(x_BTD)
    x_BTD = nn.Dropout(cfg.dropout)(x_BTD, deterministic=deterministic)
    return nn.with_logical_constraint(x_BTD, ACTIVATION_AXES), embedding


def attention_bias(cfg: ModelConfig, positions_BT: jax.Array, causal: bool) -> jax.Array | None:
    """The positional scheme's additive self-attention bias, computed once for every layer of the stack (or
    None); while decoding, against every cache slot."""
    bias_module = POSITIONALS.get(cfg.positional).attention_bias
    if bias_module is None:
        return None
    return bias_module(cfg, causal, name="attention_bias")(positions_BT)


class StackBlock(Block):
    """A Block called as a step of the stack: (x, inputs) -> (x, None), the shape nn.scan wants. `inputs` holds
    the Block's positional and keyword arguments (positions_BT, segment_ids_BT, bias_BNTS, encoded_BSD, ...),
    the same for every layer; `deterministic` is an attribute because remat and scan trace every argument."""

    deterministic: bool = True

    def __call__(self, x_BTD: jax.Array, inputs: dict[str, Any]) -> tuple[jax.Array, None]:
        kwargs = dict(inputs)
        positions_BT, segment_ids_BT = kwargs.pop("positions_BT"), kwargs.pop("segment_ids_BT")
        return super().__call__(x_BTD, positions_BT, segment_ids_BT, self.deterministic, **kwargs), None


def looped_blocks(cfg: ModelConfig, x_BTD: jax.Array, inputs: dict[str, Any], deterministic: bool, *,
                  causal: bool, cross: bool) -> jax.Array:
    """model.num_layers modules block_0 .. block_{L-1}, each under the model.remat policy."""
    block = remat_block(StackBlock, cfg.remat, scanned=False)
    for layer in range(cfg.num_layers):
        x_BTD, _ = block(cfg, causal, cross, deterministic, name=layer_layout.looped_name(layer))(x_BTD, inputs)
    return x_BTD


def scanned_blocks(cfg: ModelConfig, x_BTD: jax.Array, inputs: dict[str, Any], deterministic: bool, *,
                   causal: bool, cross: bool) -> jax.Array:
    """One nn.scan over a Block (under the model.remat policy) whose parameters are stacked on a leading
    `layers` axis; `inputs` is broadcast to every layer, parameters and dropout get a key per layer."""
    block = remat_block(StackBlock, cfg.remat, scanned=True)
    # "cache": the decoding engine's per-layer key/value cache, stacked on the same leading layers axis
    stack = nn.scan(block, variable_axes={"params": 0, "cache": 0}, split_rngs={"params": True, "dropout": True},
                    in_axes=(nn.broadcast,), length=cfg.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
    x_BTD, _ = stack(cfg, causal, cross, deterministic, name=layer_layout.SCANNED)(x_BTD, inputs)
    return x_BTD


def blocks(cfg: ModelConfig, x_BTD: jax.Array, positions_BT: jax.Array, segment_ids_BT: jax.Array | None,
           deterministic: bool, *, causal: bool, cross: bool = False, **block_kwargs: jax.Array | None) -> jax.Array:
    """model.num_layers blocks (looped, or scanned with model.scan_layers), then the final norm under pre-LN
    (post-LN blocks end normalised). `block_kwargs` go to every Block (encoded_BSD, encoded_segment_ids_BS of
    `cross` blocks, a prefix LM's prefix_BT; None values are fine, looped or scanned); the positional attention
    bias is computed here once for all layers."""
    inputs = dict(positions_BT=positions_BT, segment_ids_BT=segment_ids_BT,
                  bias_BNTS=attention_bias(cfg, positions_BT, causal), **block_kwargs)
    layout = scanned_blocks if cfg.scan_layers else looped_blocks
    x_BTD = layout(cfg, x_BTD, inputs, deterministic, causal=causal, cross=cross)
    if cfg.norm_position == "pre":
        x_BTD = NORMS.get(cfg.norm)(cfg, name="final_norm")(x_BTD)
    return x_BTD
