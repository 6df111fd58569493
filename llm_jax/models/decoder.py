"""The decoder-only (GPT-style) causal language model."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_jax.models.blocks import ACTIVATION_AXES, DecoderBlock
from llm_jax.models.embeddings import OutputHead, TokenEmbedding, mask_padded_vocab
from llm_jax.models.model_config import ModelConfig
from llm_jax.models.norms import NORMS
from llm_jax.models.positions import POSITIONALS


def positions_from_segments(segment_ids_BT: jnp.ndarray | None, shape: tuple[int, int]) -> jnp.ndarray:
    """0, 1, 2, ... per row, restarting wherever the segment id changes (packed rows)."""
    index_BT = jnp.broadcast_to(jnp.arange(shape[1]), shape)
    if segment_ids_BT is None:
        return index_BT
    starts_BT = jnp.concatenate([jnp.ones((shape[0], 1), bool), segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], 1)
    return index_BT - jax.lax.cummax(jnp.where(starts_BT, index_BT, 0), axis=1)


class DecoderLM(nn.Module):
    """tokens -> embeddings (+ positions) -> blocks -> final norm -> logits over the padded vocabulary.

    Logits of the padding rows are masked to the dtype minimum, so softmax, loss and sampling never see
    them; callers that export logits slice `[..., :vocab_size]`.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, tokens_BT: jnp.ndarray, positions_BT: jnp.ndarray | None = None,
                 segment_ids_BT: jnp.ndarray | None = None, *, deterministic: bool = True) -> jnp.ndarray:
        cfg = self.config
        if positions_BT is None:
            positions_BT = positions_from_segments(segment_ids_BT, tokens_BT.shape)
        embed = TokenEmbedding(cfg, name="token_embedding")
        x_BTD = embed(tokens_BT)
        position_module = POSITIONALS.get(cfg.positional).embedding
        if position_module is not None:
            x_BTD = x_BTD + position_module(cfg, name="position_embedding")(positions_BT)
        x_BTD = nn.Dropout(cfg.dropout)(x_BTD, deterministic=deterministic)
        x_BTD = nn.with_logical_constraint(x_BTD, ACTIVATION_AXES)
        for layer in range(cfg.num_layers):
            x_BTD = DecoderBlock(cfg, name=f"block_{layer}")(x_BTD, positions_BT, segment_ids_BT, deterministic)
        x_BTD = NORMS.get(cfg.norm)(cfg, name="final_norm")(x_BTD)
        if cfg.tie_embeddings:
            logits_BTV = embed.attend(x_BTD)
        else:
            logits_BTV = OutputHead(cfg, name="output_head")(x_BTD)
        logits_BTV = nn.with_logical_constraint(logits_BTV, ("batch", "seq", "act_vocab"))
        return mask_padded_vocab(logits_BTV.astype(jnp.float32), cfg.vocab_size)
