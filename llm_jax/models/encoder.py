"""The encoder-only (BERT-style) family: embed (+ token types, norm) -> bidirectional blocks -> pooler ->
heads (masked LM, sentence pair, sequence or token classification)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_jax.models import stack
from llm_jax.models.heads import apply_heads, linear
from llm_jax.models.model_config import ModelConfig
from llm_jax.models.outputs import Outputs


class Pooler(nn.Module):
    """BERT's pooler: tanh(dense(hidden state of the first token))."""

    config: ModelConfig

    @nn.compact
    def __call__(self, hidden_BTD: jax.Array) -> jax.Array:
        cfg = self.config
        return jnp.tanh(linear(self, cfg, hidden_BTD[:, 0], cfg.d_model)).astype(cfg.dtype)


class Encoder(nn.Module):
    """Bidirectional Transformer encoder. `segment_ids_BT`: packed-sequence ids, 0 on padding (no query reads a
    padding key); `token_types_BT`: BERT's sentence A/B ids; `prediction_positions_BP`: the positions the
    masked-LM head predicts (all positions when None)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, tokens_BT: jax.Array, positions_BT: jax.Array | None = None,
                 segment_ids_BT: jax.Array | None = None, token_types_BT: jax.Array | None = None,
                 prediction_positions_BP: jax.Array | None = None, *, deterministic: bool = True) -> Outputs:
        cfg = self.config
        if positions_BT is None:
            positions_BT = stack.positions_from_segments(segment_ids_BT, tokens_BT.shape, padding_continues=True)
        x_BTD, embedding = stack.embed(cfg, tokens_BT, positions_BT, token_types_BT, deterministic)
        x_BTD = stack.blocks(cfg, x_BTD, positions_BT, segment_ids_BT, deterministic, causal=False)
        pooled_BD = None
        if cfg.pooler:
            pooled_BD = Pooler(cfg, name="pooler")(x_BTD)
        elif any(name in cfg.heads for name in ("nsp", "classifier")):
            pooled_BD = x_BTD[:, 0]  # without a pooler the first ([CLS]) token's state is the summary
        heads = apply_heads(cfg, x_BTD, pooled_BD, embedding, deterministic, prediction_positions_BP)
        return Outputs(x_BTD, pooled_BD, heads)
