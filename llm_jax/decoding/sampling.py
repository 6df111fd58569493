"""Top-k / top-p filtering (used by the decoding engine) and the reference sampler without a cache.

`sample` re-reads the whole window of max_len tokens for every new token (no KV cache, one compiled shape):
generate and the Python API use `llm_jax.decoding.engine`; this one stays as the uncached baseline of
benchmarks/decode_latency.py and of the tests.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.decoding.options import DecodeOptions


def filter_logits(logits_V: jax.Array, top_k: int, top_p: float) -> jax.Array:
    """Keeps the top_k largest logits and the smallest set whose probability reaches top_p."""
    masked_V = logits_V
    if top_k > 0:
        kth = jnp.sort(logits_V)[-min(top_k, logits_V.shape[-1])]
        masked_V = jnp.where(logits_V < kth, -jnp.inf, masked_V)
    if top_p < 1.0:
        order_V = jnp.argsort(-masked_V)
        probs_V = jax.nn.softmax(masked_V[order_V])
        keep_sorted_V = (jnp.cumsum(probs_V) - probs_V) < top_p  # always keeps the most likely token
        keep_V = jnp.zeros_like(keep_sorted_V).at[order_V].set(keep_sorted_V)
        masked_V = jnp.where(keep_V, masked_V, -jnp.inf)
    return masked_V


def lm_logits(model: Any) -> Callable[..., jax.Array]:
    """(variables, tokens_BT, ...) -> the LM head's logits_BTV of a model that returns named outputs."""
    return lambda variables, *inputs, **options: model.apply(variables, *inputs, **options).heads["lm"]


def make_next_token(apply_fn: Callable[..., jax.Array], vocab_size: int, sampling: DecodeOptions):
    """A jitted (params, window_1L, length, key) -> next token id, reading the logits at length - 1."""

    @jax.jit
    def next_token(params: Any, window_1L: jax.Array, length: jax.Array, key: jax.Array) -> jax.Array:
        logits_1LV = apply_fn({"params": params}, window_1L)
        logits_V = jax.lax.dynamic_index_in_dim(logits_1LV[0], length - 1, keepdims=False)[:vocab_size]
        if sampling.temperature == 0:
            return jnp.argmax(logits_V)
        logits_V = filter_logits(logits_V / sampling.temperature, sampling.top_k, sampling.top_p)
        return jax.random.categorical(key, logits_V)

    return next_token


def sample(apply_fn: Callable[..., jax.Array], params: Any, prompt_ids: Sequence[int], *, max_len: int,
           vocab_size: int, sampling: DecodeOptions) -> list[int]:
    """Prompt + max_new_tokens sampled ids; past max_len the window slides over the last max_len tokens."""
    if not prompt_ids:
        raise ValueError("the prompt encodes to no tokens; give a non-empty --prompt")
    next_token = make_next_token(apply_fn, vocab_size, sampling)
    tokens = list(prompt_ids)
    base_key = jax.random.key(sampling.seed)
    for i in range(sampling.max_new_tokens):
        context = tokens[-max_len:]
        window_1L = np.zeros((1, max_len), np.int32)
        window_1L[0, :len(context)] = context
        token = next_token(params, window_1L, np.int32(len(context)), jax.random.fold_in(base_key, i))
        tokens.append(int(token))
    return tokens
