"""The decoding engine for encoder-decoder models: the same strategies (greedy, sampling, beam search) and
programs as decoders, with a different prefill and scoring.

Prefill encodes the right-padded prompts once (segment ids mark their real tokens), then runs the decoder on
the start token (the pad id, as in training: llm_jax.data.seq2seq_rows) at position 0 with the encoder output,
which fills each layer's cross-attention cache (keys, values, key segments); every later step feeds one token
and reads that cache, so the encoder output is never projected again. The decoder's context is its own tokens
only: new tokens are capped at model.max_len - 1 (no window slides; a warning says so), and prompts longer than
model.max_len keep their last tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from llm_jax.decoding.engine import (CACHE_BUCKET, MAX_ROWS, PROMPT_BUCKET, Engine, _round_up,
                                    right_pad)
from llm_jax.decoding.options import DecodeOptions


def prompt_segments(tokens_BP: jax.Array, lengths_B: jax.Array) -> jax.Array:
    """1 on each row's real tokens, 0 on its right padding."""
    return (jnp.arange(tokens_BP.shape[1])[None, :] < lengths_B[:, None]).astype(jnp.int32)


class EncoderDecoderEngine(Engine):
    """Engine whose prompts are encoder inputs and whose decoder starts from the start token."""

    def forward(self, params: Any, cache: Any, tokens_BT: jax.Array, positions_BT: jax.Array,
                encoded_BSD: jax.Array | None = None, segments_BS: jax.Array | None = None) -> tuple[jax.Array, Any]:
        outputs, variables = self.model.apply({"params": params, "cache": cache}, tokens_BT, positions_BT, None,
                                              encoded_BSD, segments_BS, method="decode", mutable=["cache"])
        return outputs.heads["lm"][..., :self.vocab_size].astype(jnp.float32), variables["cache"]

    def empty_cache(self, params: Any, batch: int, slots: int, encoded_BSD: jax.Array | None = None) -> Any:
        """Zeros shaped like the cache of `slots` decoder positions and (for `encoded_BSD`'s length) the
        cross-attention entries."""
        tokens_BS = jnp.zeros((batch, slots), jnp.int32)
        encoded = encoded_BSD if encoded_BSD is not None else jnp.zeros((batch, 1, self.model.config.d_model))

        def trace(p):
            return self.model.apply({"params": p}, tokens_BS, None, None, encoded, None, method="decode",
                                    mutable=["cache"])[1]["cache"]

        shapes = jax.eval_shape(trace, params)
        return jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), shapes)

    def prefill(self, params: Any, tokens_BP: jax.Array, lengths_B: jax.Array, slots: int) -> tuple[jax.Array, Any]:
        segments_BP = prompt_segments(tokens_BP, lengths_B)
        encoded_BPD = self.model.apply({"params": params}, tokens_BP, None, segments_BP, method="encode")
        B = tokens_BP.shape[0]
        start_B1 = jnp.full((B, 1), self.pad_id, jnp.int32)
        cache = self.empty_cache(params, B, slots, encoded_BPD)
        logits_B1V, cache = self.forward(params, cache, start_B1, jnp.zeros((B, 1), jnp.int32), encoded_BPD,
                                         segments_BP)
        return logits_B1V[:, 0], cache

    def decoded_lengths(self, lengths_B: jax.Array) -> jax.Array:
        return jnp.ones_like(lengths_B)  # the start token

    def cache_slots(self, longest: int, steps: int) -> int:
        return min(_round_up(steps + 1, CACHE_BUCKET), self.max_len)

    def prompt_width(self, longest: int, slots: int) -> int:
        return _round_up(longest, PROMPT_BUCKET)

    def window(self, new_left: int, longest: int, beam: bool = False) -> tuple[int, int]:
        return min(longest, self.max_len), min(new_left, self.max_len - 1)

    def generate(self, params: Any, prompts: Sequence[Sequence[int]], options: DecodeOptions,
                 max_rows: int = MAX_ROWS) -> list[list[int]]:
        """As Engine.generate, with max_new_tokens capped at model.max_len - 1 (the decoder's one window)."""
        if options.max_new_tokens >= self.max_len:
            logging.warning("max_new_tokens=%d: an encoder-decoder's decoder writes at most model.max_len - 1 = %d "
                            "tokens", options.max_new_tokens, self.max_len - 1)
            options = dataclasses.replace(options, max_new_tokens=self.max_len - 1)
        return super().generate(params, prompts, options, max_rows)

    def score(self, params: Any, prompts: Sequence[Sequence[int]],
              continuations: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """log p(continuation token | prompt, earlier continuation tokens), one teacher-forced pass per batch."""
        self.check_scoring(prompts, continuations)
        contexts = [list(p)[-self.max_len:] for p in prompts]
        tokens_BP, lengths_B = right_pad(contexts, _round_up(max(len(c) for c in contexts), PROMPT_BUCKET),
                                         self.pad_id)
        targets_BT, target_lengths_B = right_pad(continuations, min(_round_up(max(map(len, continuations)),
                                                                              PROMPT_BUCKET), self.max_len),
                                                 self.pad_id)
        program = self.compiled("score", DecodeOptions(), lambda: seq2seq_score_program(self))
        logp_BT = np.asarray(program(params, tokens_BP, lengths_B, targets_BT))
        return [logp_BT[b, :length] for b, length in enumerate(target_lengths_B)]


def seq2seq_score_program(engine: EncoderDecoderEngine) -> Callable:
    """jit(params, tokens_BP, lengths_B, targets_BT) -> logp_BT of each target given the ones before it."""

    def program(params, tokens_BP, lengths_B, targets_BT):
        decoder_inputs_BT = jnp.concatenate([jnp.full_like(targets_BT[:, :1], engine.pad_id), targets_BT[:, :-1]], 1)
        outputs = engine.model.apply({"params": params}, tokens_BP, decoder_inputs_BT,
                                     segment_ids_BS=prompt_segments(tokens_BP, lengths_B))
        logp_BTV = jax.nn.log_softmax(outputs.heads["lm"][..., :engine.vocab_size].astype(jnp.float32))
        return jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]

    return jax.jit(program)
