"""The decoder-only (GPT-style) language model: embed -> causal (or prefix-LM) blocks -> heads."""

from __future__ import annotations

import flax.linen as nn
import jax

from llm_jax.models import stack
from llm_jax.models.attention_masks import uses_prefix
from llm_jax.models.heads import apply_heads
from llm_jax.models.model_config import ModelConfig
from llm_jax.models.outputs import Outputs


class DecoderLM(nn.Module):
    """tokens -> embeddings (+ positions) -> causal blocks -> final norm -> heads (the LM head: logits over the
    padded vocabulary, padding rows masked to the dtype minimum; callers that export logits slice
    `[..., :vocab_size]`). Under model.attention_mask=prefix_lm, `prefix_BT` (1 on prefix tokens) makes the
    prefix attend bidirectionally; a causal model ignores it (its program is unchanged)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, tokens_BT: jax.Array, positions_BT: jax.Array | None = None,
                 segment_ids_BT: jax.Array | None = None, token_types_BT: jax.Array | None = None, *,
                 deterministic: bool = True, prefix_BT: jax.Array | None = None) -> Outputs:
        cfg = self.config
        if positions_BT is None:
            positions_BT = stack.positions_from_segments(segment_ids_BT, tokens_BT.shape)
        x_BTD, embedding = stack.embed(cfg, tokens_BT, positions_BT, token_types_BT, deterministic)
        prefix_BT = prefix_BT if uses_prefix(cfg) else None
        x_BTD = stack.blocks(cfg, x_BTD, positions_BT, segment_ids_BT, deterministic, causal=True,
                             prefix_BT=prefix_BT)
        return Outputs(x_BTD, None, apply_heads(cfg, x_BTD, None, embedding, deterministic))
