"""The encoder-decoder family (T5, the original Transformer): a bidirectional encoder over the inputs, a causal
decoder with cross-attention over the encoder's outputs, one token embedding shared by both (and by the LM head
when model.tie_embeddings).

Styles are config presets (configs/encoder_decoder.py): T5 = positional=t5_relative_bias (one bias table per
stack, shared by its layers), RMSNorm, pre-LN, no biases, unscaled attention logits, optional gated GELU
(model.scale_decoder_outputs: T5 v1.0's d_model**-0.5 before its tied head); the original Transformer =
sinusoidal positions, post-LN LayerNorm, ReLU, embeddings scaled by sqrt(d_model).

Decoding (llm_jax.decoding): `encode` runs the encoder once; `decode` with a mutable "cache" collection caches
the decoder's self-attention keys/values per position and, on the call that receives `encoded_BSD` (prefill),
each layer's cross-attention keys/values, which later steps read (encoded_BSD=None).

Shape letters: B batch, S encoder positions, T decoder positions, D d_model, V padded vocabulary.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_jax.models import stack
from llm_jax.models.embeddings import TokenEmbedding
from llm_jax.models.heads import apply_heads
from llm_jax.models.model_config import ModelConfig
from llm_jax.models.outputs import Outputs


class EncoderStack(nn.Module):
    """Shared embedding (+ positions) -> bidirectional blocks -> final norm (pre-LN)."""

    config: ModelConfig
    embedding: TokenEmbedding

    @nn.compact
    def __call__(self, tokens_BS: jax.Array, positions_BS: jax.Array, segment_ids_BS: jax.Array | None,
                 deterministic: bool) -> jax.Array:
        x_BSD, _ = stack.embed(self.config, tokens_BS, positions_BS, None, deterministic, self.embedding)
        return stack.blocks(self.config, x_BSD, positions_BS, segment_ids_BS, deterministic, causal=False)


class DecoderStack(nn.Module):
    """Shared embedding (+ positions) -> causal blocks with cross-attention -> final norm -> heads."""

    config: ModelConfig
    embedding: TokenEmbedding

    @nn.compact
    def __call__(self, tokens_BT: jax.Array, positions_BT: jax.Array, segment_ids_BT: jax.Array | None,
                 encoded_BSD: jax.Array | None, encoded_segment_ids_BS: jax.Array | None,
                 deterministic: bool) -> Outputs:
        cfg = self.config
        x_BTD, _ = stack.embed(cfg, tokens_BT, positions_BT, None, deterministic, self.embedding)
        x_BTD = stack.blocks(cfg, x_BTD, positions_BT, segment_ids_BT, deterministic, causal=True, cross=True,
                             encoded_BSD=encoded_BSD, encoded_segment_ids_BS=encoded_segment_ids_BS)
        hidden_BTD = x_BTD * jnp.asarray(cfg.d_model ** -0.5, x_BTD.dtype) if cfg.scale_decoder_outputs else x_BTD
        return Outputs(x_BTD, None, apply_heads(cfg, hidden_BTD, None, self.embedding, deterministic))


class EncoderDecoder(nn.Module):
    """(inputs, decoder inputs) -> Outputs of the decoder (hidden states, heads["lm"] logits over the padded
    vocabulary). `segment_ids`: packed-example ids, 0 on padding; a decoder position attends across to the
    encoder positions of its own segment. Positions default to 0, 1, ... restarting per segment."""

    config: ModelConfig

    def setup(self) -> None:
        cfg = self.config
        self.token_embedding = TokenEmbedding(cfg)
        self.encoder = EncoderStack(cfg, self.token_embedding)
        self.decoder = DecoderStack(cfg.replace(num_layers=cfg.num_decoder_layers), self.token_embedding)

    def __call__(self, tokens_BS: jax.Array, decoder_tokens_BT: jax.Array, positions_BS: jax.Array | None = None,
                 segment_ids_BS: jax.Array | None = None, decoder_positions_BT: jax.Array | None = None,
                 decoder_segment_ids_BT: jax.Array | None = None, *, deterministic: bool = True) -> Outputs:
        encoded_BSD = self.encode(tokens_BS, positions_BS, segment_ids_BS, deterministic=deterministic)
        return self.decode(decoder_tokens_BT, decoder_positions_BT, decoder_segment_ids_BT, encoded_BSD,
                           segment_ids_BS, deterministic=deterministic)

    def encode(self, tokens_BS: jax.Array, positions_BS: jax.Array | None = None,
               segment_ids_BS: jax.Array | None = None, *, deterministic: bool = True) -> jax.Array:
        if positions_BS is None:
            positions_BS = stack.positions_from_segments(segment_ids_BS, tokens_BS.shape, padding_continues=True)
        return self.encoder(tokens_BS, positions_BS, segment_ids_BS, deterministic)

    def decode(self, decoder_tokens_BT: jax.Array, decoder_positions_BT: jax.Array | None,
               decoder_segment_ids_BT: jax.Array | None, encoded_BSD: jax.Array | None,
               encoded_segment_ids_BS: jax.Array | None, *, deterministic: bool = True) -> Outputs:
        """The decoder over `encoded_BSD` (None: a decoding step reading the cross-attention cache)."""
        if decoder_positions_BT is None:
            decoder_positions_BT = stack.positions_from_segments(decoder_segment_ids_BT, decoder_tokens_BT.shape)
        if encoded_BSD is not None and encoded_segment_ids_BS is None:
            encoded_segment_ids_BS = jnp.ones(encoded_BSD.shape[:2], jnp.int32)
        return self.decoder(decoder_tokens_BT, decoder_positions_BT, decoder_segment_ids_BT, encoded_BSD,
                            encoded_segment_ids_BS, deterministic)
