"""Sampling: top-k / top-p filtering, greedy decoding against a hand-written argmax loop, seeds, the sliding
window past max_len."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.model_sizes import apply_model_size
from llm_jax import config as config_lib
from llm_jax.decoding.options import DecodeOptions
from llm_jax.decoding.sampling import filter_logits, lm_logits, sample
from llm_jax.models.families import build_model
from llm_jax.models.model_config import build_model_config

VOCAB, MAX_LEN = 20, 16


# ----------------------------------------------------------------------------- filter_logits


def _logits(seed=0, size=VOCAB):
    return jnp.asarray(np.random.default_rng(seed).normal(size=size) * 3.0, jnp.float32)


@pytest.mark.parametrize("k", [1, 3, 7, VOCAB])
def test_top_k_keeps_exactly_the_k_largest(k):
    logits = _logits()
    filtered = np.asarray(filter_logits(logits, top_k=k, top_p=1.0))
    largest = set(np.argsort(-np.asarray(logits))[:k].tolist())
    kept = set(np.flatnonzero(np.isfinite(filtered)).tolist())
    assert kept == largest
    np.testing.assert_array_equal(filtered[list(kept)], np.asarray(logits)[list(kept)])
    assert np.all(filtered[~np.isfinite(filtered)] == -np.inf)


def test_top_k_zero_and_top_p_one_are_off():
    logits = _logits()
    np.testing.assert_array_equal(filter_logits(logits, top_k=0, top_p=1.0), logits)
    np.testing.assert_array_equal(filter_logits(logits, top_k=VOCAB + 5, top_p=1.0), logits)


PROBS = np.array([0.05, 0.5, 0.1, 0.2, 0.15])  # sorted: 0.5 (1), 0.2 (3), 0.15 (4), 0.1 (2), 0.05 (0)


@pytest.mark.parametrize("top_p, kept", [
    (0.01, {1}),  # the most likely token is always kept
    (0.45, {1}),
    (0.69, {1, 3}),  # 0.5 < 0.69 <= 0.5 + 0.2
    (0.8, {1, 3, 4}),
    (0.9, {1, 3, 4, 2}),
    (0.99, {1, 3, 4, 2, 0}),
])
def test_top_p_keeps_the_smallest_prefix_reaching_p(top_p, kept):
    logits = jnp.log(jnp.asarray(PROBS, jnp.float32)) + 1.7  # a shift does not change the probabilities
    filtered = np.asarray(filter_logits(logits, top_k=0, top_p=top_p))
    assert set(np.flatnonzero(np.isfinite(filtered)).tolist()) == kept
    np.testing.assert_allclose(filtered[list(kept)], np.asarray(logits)[list(kept)])
    assert np.all(filtered[~np.isfinite(filtered)] == -np.inf)


def test_top_p_always_keeps_the_argmax_of_a_peaked_distribution():
    logits = _logits(seed=3).at[5].set(100.0)
    filtered = np.asarray(filter_logits(logits, top_k=0, top_p=0.5))
    assert np.flatnonzero(np.isfinite(filtered)).tolist() == [5]


def test_top_p_on_random_logits_matches_a_numpy_reference():
    for seed in range(5):
        logits = np.asarray(_logits(seed=seed))
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        order = np.argsort(-probs)
        cumulative = np.cumsum(probs[order])
        size = int(np.searchsorted(cumulative, 0.8)) + 1  # smallest prefix whose mass reaches 0.8
        filtered = np.asarray(filter_logits(jnp.asarray(logits), top_k=0, top_p=0.8))
        assert set(np.flatnonzero(np.isfinite(filtered)).tolist()) == set(order[:size].tolist())


# ----------------------------------------------------------------------------- sample


@pytest.fixture(scope="module")
def model_and_params():
    config = config_lib.default_config()
    apply_model_size(config, "test")
    config.model.update(max_len=MAX_LEN)
    model = build_model(build_model_config(config.model, VOCAB, {"data": 1, "fsdp": 1, "tensor": 1}))
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, MAX_LEN), jnp.int32))["params"])
    # Random parameters from numpy (model.init's jax.random costs seconds of CPU compilation), with a
    # stddev of 0.3 that spreads the logits so greedy choices are not near-ties decided by rounding.
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda leaf: jnp.asarray(0.3 * rng.normal(size=leaf.shape), leaf.dtype), shapes)
    return model, params


def _sample(model_and_params, prompt, **sampling):
    model, params = model_and_params
    return sample(lm_logits(model), params, prompt, max_len=MAX_LEN, vocab_size=VOCAB,
                  sampling=DecodeOptions(**sampling))


@pytest.fixture(scope="module")
def greedy_by_hand(model_and_params):
    """Greedy decoding written out: the last MAX_LEN tokens, the argmax of the logits at the last of them.

    Windows are padded to MAX_LEN (one compiled shape) with random filler, unlike the sampler's zeros: a causal
    model's logits at the context's end cannot depend on what follows it."""
    model, params = model_and_params
    apply = jax.jit(lm_logits(model))
    filler = np.random.default_rng(1).integers(0, VOCAB, size=MAX_LEN)

    def greedy(prompt, steps):
        tokens = list(prompt)
        for _ in range(steps):
            context = tokens[-MAX_LEN:]
            window = filler.copy()
            window[:len(context)] = context
            logits = np.asarray(apply({"params": params}, window[None].astype(np.int32)))[0, len(context) - 1]
            tokens.append(int(np.argmax(logits[:VOCAB])))
        return tokens

    return greedy


def test_temperature_zero_is_greedy(model_and_params, greedy_by_hand):
    prompt = [3, 1, 4, 1, 5]
    tokens = _sample(model_and_params, prompt, max_new_tokens=8, temperature=0.0, seed=0)
    assert tokens == greedy_by_hand(prompt, 8)
    # the seed does not matter for greedy decoding
    assert tokens == _sample(model_and_params, prompt, max_new_tokens=8, temperature=0.0, seed=7)


def test_prompt_longer_than_max_len_slides_the_window(model_and_params, greedy_by_hand):
    prompt = [int(t) for t in np.random.default_rng(0).integers(0, VOCAB, size=MAX_LEN + 5)]
    tokens = _sample(model_and_params, prompt, max_new_tokens=6, temperature=0.0)
    assert len(tokens) == len(prompt) + 6 and tokens[:len(prompt)] == prompt
    assert tokens == greedy_by_hand(prompt, 6)
    sampled = _sample(model_and_params, prompt, max_new_tokens=6, temperature=1.0, seed=1)
    assert len(sampled) == len(prompt) + 6 and sampled[:len(prompt)] == prompt


def test_sampling_is_reproducible_per_seed_and_differs_across_seeds(model_and_params):
    prompt = [1, 2, 3]
    runs = {seed: _sample(model_and_params, prompt, max_new_tokens=12, temperature=1.0, seed=seed)
            for seed in (0, 1)}
    assert runs[0] == _sample(model_and_params, prompt, max_new_tokens=12, temperature=1.0, seed=0)
    assert runs[0] != runs[1]
    for tokens in runs.values():
        assert len(tokens) == 15 and tokens[:3] == prompt
        assert all(0 <= t < VOCAB for t in tokens), "padded vocabulary rows must never be sampled"


def _constant_logits_apply(logits_V):
    """An apply_fn whose logits are `logits_V` at every position, whatever the window."""
    def apply_fn(variables, window_1L):
        return jnp.broadcast_to(jnp.asarray(logits_V, jnp.float32), window_1L.shape + (len(logits_V),))

    return apply_fn


def test_every_new_token_gets_its_own_random_draw():
    # uniform over the 20 real ids; the 12 padded rows have huge logits and must be cut off by vocab_size
    logits = np.concatenate([np.zeros(VOCAB), np.full(12, 50.0)])
    tokens = sample(_constant_logits_apply(logits), {}, [0], max_len=MAX_LEN, vocab_size=VOCAB,
                    sampling=DecodeOptions(max_new_tokens=60, temperature=1.0, seed=0))[1:]
    assert all(0 <= t < VOCAB for t in tokens)
    assert len(set(tokens)) >= 10, f"draws are not independent across steps: {tokens}"


def test_temperature_sharpens_and_flattens():
    logits = np.zeros(VOCAB)
    logits[3] = 2.0  # p(3) = e^2 / (e^2 + 19) = 0.28 at temperature 1

    def frequency_of_3(temperature):
        tokens = sample(_constant_logits_apply(logits), {}, [0], max_len=MAX_LEN, vocab_size=VOCAB,
                        sampling=DecodeOptions(max_new_tokens=100, temperature=temperature, seed=0))[1:]
        return tokens.count(3) / len(tokens)

    assert frequency_of_3(0.1) > 0.95  # p = 1 / (1 + 19 e^-20)
    assert 0.1 < frequency_of_3(1.0) < 0.5
    assert frequency_of_3(100.0) < 0.15  # nearly uniform: p = 0.051


def test_top_k_one_sampling_is_greedy(model_and_params, greedy_by_hand):
    prompt = [7, 7, 2]
    greedy = greedy_by_hand(prompt, 6)
    assert _sample(model_and_params, prompt, max_new_tokens=6, temperature=1.5, top_k=1, seed=4) == greedy


def test_zero_new_tokens_returns_the_prompt(model_and_params):
    assert _sample(model_and_params, [4, 2], max_new_tokens=0) == [4, 2]


def test_empty_prompt_raises(model_and_params):
    with pytest.raises(ValueError, match="prompt"):
        _sample(model_and_params, [], max_new_tokens=3)
