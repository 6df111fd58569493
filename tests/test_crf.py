"""The linear-chain CRF against brute-force enumeration of all label sequences."""

from __future__ import annotations

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax.models.crf import CRF, crf_log_likelihood, gather_labeled, scatter_labeled, viterbi_decode

C, T = 3, 4

_log_likelihood = jax.jit(crf_log_likelihood)
_viterbi = jax.jit(viterbi_decode)


def _random_crf(seed: int, batch: int = 1, length: int = T, labels: int = C):
    rng = np.random.default_rng(seed)
    emissions_BTC = rng.normal(size=(batch, length, labels)).astype(np.float32)
    transitions_CC = rng.normal(size=(labels, labels)).astype(np.float32)
    start_C = rng.normal(size=labels).astype(np.float32)
    end_C = rng.normal(size=labels).astype(np.float32)
    return emissions_BTC, transitions_CC, start_C, end_C


def _prefix_mask(lengths: list[int], length: int = T) -> np.ndarray:
    return np.arange(length)[None, :] < np.asarray(lengths)[:, None]


def _path_score(emissions_TC, path, transitions_CC, start_C, end_C) -> float:
    score = start_C[path[0]] + end_C[path[-1]] + sum(emissions_TC[t, y] for t, y in enumerate(path))
    return float(score + sum(transitions_CC[a, b] for a, b in zip(path[:-1], path[1:])))


def _brute_force(emissions_TC, transitions_CC, start_C, end_C):
    """All paths over emissions_TC with their log-probabilities."""
    paths = list(itertools.product(range(emissions_TC.shape[1]), repeat=emissions_TC.shape[0]))
    scores = np.array([_path_score(emissions_TC, p, transitions_CC, start_C, end_C) for p in paths])
    return paths, scores - np.logaddexp.reduce(scores)


def test_log_likelihood_matches_enumeration():
    lengths = [4, 3, 1, 0, 2]
    emissions_BTC, transitions_CC, start_C, end_C = _random_crf(0, batch=len(lengths))
    rng = np.random.default_rng(1)
    tags_BT = rng.integers(0, C, size=(len(lengths), T))
    mask_BT = _prefix_mask(lengths)
    got_B = _log_likelihood(jnp.asarray(emissions_BTC), jnp.asarray(tags_BT), jnp.asarray(mask_BT),
                               transitions_CC, start_C, end_C)
    for b, n in enumerate(lengths):
        if n == 0:
            assert float(got_B[b]) == 0.0
            continue
        paths, log_probs = _brute_force(emissions_BTC[b, :n], transitions_CC, start_C, end_C)
        expected = log_probs[paths.index(tuple(tags_BT[b, :n]))]
        np.testing.assert_allclose(float(got_B[b]), expected, atol=1e-5)


def test_probabilities_sum_to_one():
    emissions_BTC, transitions_CC, start_C, end_C = _random_crf(2)
    paths = list(itertools.product(range(C), repeat=T))
    tags_PT = jnp.asarray(paths)
    mask_PT = jnp.ones(tags_PT.shape, bool)
    emissions_PTC = jnp.broadcast_to(jnp.asarray(emissions_BTC), (len(paths), T, C))
    log_probs_P = _log_likelihood(emissions_PTC, tags_PT, mask_PT, transitions_CC, start_C, end_C)
    np.testing.assert_allclose(float(jnp.exp(log_probs_P).sum()), 1.0, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_viterbi_matches_brute_force_argmax(seed):
    lengths = [4, 1, 3, 0, 2]
    emissions_BTC, transitions_CC, start_C, end_C = _random_crf(seed, batch=len(lengths))
    mask_BT = _prefix_mask(lengths)
    tags_BT = np.asarray(_viterbi(jnp.asarray(emissions_BTC), jnp.asarray(mask_BT), transitions_CC, start_C, end_C))
    assert tags_BT.dtype == np.int32
    for b, n in enumerate(lengths):
        assert (tags_BT[b, n:] == 0).all()
        if n == 0:
            continue
        paths, log_probs = _brute_force(emissions_BTC[b, :n], transitions_CC, start_C, end_C)
        assert tuple(tags_BT[b, :n]) == paths[int(np.argmax(log_probs))]


def test_gather_and_scatter_roundtrip():
    mask_BT = jnp.asarray([[1, 0, 1, 1, 0, 1], [0, 0, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]], bool)
    tags_BT = jnp.asarray([[1, 9, 2, 0, 9, 1], [9, 9, 2, 9, 9, 9], [9, 9, 9, 9, 9, 9]])
    emissions_BTC = jnp.arange(3 * 6 * 2, dtype=jnp.float32).reshape(3, 6, 2)
    gathered_BTC, gathered_BT, compact_BT = jax.jit(gather_labeled)(emissions_BTC, tags_BT, mask_BT)
    np.testing.assert_array_equal(compact_BT, _prefix_mask([4, 1, 0], 6))
    np.testing.assert_array_equal(gathered_BT[0, :4], [1, 2, 0, 1])
    np.testing.assert_array_equal(gathered_BTC[0, :4], emissions_BTC[0, jnp.asarray([0, 2, 3, 5])])
    restored_BT = jax.jit(scatter_labeled)(gathered_BT, mask_BT)
    np.testing.assert_array_equal(restored_BT, jnp.where(mask_BT, tags_BT, 0))


def _crf_variables(seed: int, labels: int = C):
    _, transitions_CC, start_C, end_C = _random_crf(seed, labels=labels)
    return {"params": {"transitions": jnp.asarray(transitions_CC), "start": jnp.asarray(start_C),
                       "end": jnp.asarray(end_C)}}


def test_module_non_contiguous_mask_matches_compacted_prefix():
    crf = CRF(num_labels=C)
    variables = _crf_variables(5)
    log_likelihood = jax.jit(lambda e, t, m: crf.apply(variables, e, t, m, method=CRF.log_likelihood))
    decode = jax.jit(lambda e, m: crf.apply(variables, e, m, method=CRF.decode))
    rng = np.random.default_rng(6)
    mask_BT = jnp.asarray([[1, 0, 1, 1, 0, 0, 1], [0, 1, 0, 0, 0, 0, 0], [0] * 7, [1] * 7], bool)
    emissions_BTC = jnp.asarray(rng.normal(size=(4, 7, C)), jnp.float32)
    tags_BT = jnp.asarray(rng.integers(0, C, size=(4, 7)))
    scattered_B = log_likelihood(emissions_BTC, tags_BT, mask_BT)

    order = [np.flatnonzero(row) for row in np.asarray(mask_BT)]
    lengths = [len(o) for o in order]
    compact_mask_BT = _prefix_mask(lengths, 7)
    compact_emissions_BTC = np.zeros((4, 7, C), np.float32)
    compact_tags_BT = np.zeros((4, 7), np.int64)
    for b, o in enumerate(order):
        compact_emissions_BTC[b, :len(o)] = emissions_BTC[b, o]
        compact_tags_BT[b, :len(o)] = tags_BT[b, o]
    prefix_B = log_likelihood(jnp.asarray(compact_emissions_BTC), jnp.asarray(compact_tags_BT),
                              jnp.asarray(compact_mask_BT))
    np.testing.assert_allclose(scattered_B, prefix_B, atol=1e-6)

    decoded_BT = np.asarray(decode(emissions_BTC, mask_BT))
    compact_decoded_BT = np.asarray(decode(jnp.asarray(compact_emissions_BTC), jnp.asarray(compact_mask_BT)))
    for b, o in enumerate(order):
        np.testing.assert_array_equal(decoded_BT[b, o], compact_decoded_BT[b, :len(o)])
    assert (decoded_BT[~np.asarray(mask_BT)] == 0).all()


def test_nll_gradient_is_marginal_minus_one_hot():
    emissions_BTC, transitions_CC, start_C, end_C = _random_crf(7, length=3)
    tags_BT = jnp.asarray([[2, 0, 1]])
    mask_BT = jnp.ones((1, 3), bool)

    def nll(emissions_BTC):
        return -_log_likelihood(emissions_BTC, tags_BT, mask_BT, transitions_CC, start_C, end_C).sum()

    grad_BTC = np.asarray(jax.jit(jax.grad(nll))(jnp.asarray(emissions_BTC)))
    assert np.isfinite(grad_BTC).all()
    paths, log_probs = _brute_force(emissions_BTC[0], transitions_CC, start_C, end_C)
    marginals_TC = np.zeros((3, C))
    for path, log_prob in zip(paths, log_probs):
        marginals_TC[np.arange(3), list(path)] += np.exp(log_prob)
    one_hot_TC = np.eye(C)[np.asarray(tags_BT[0])]
    np.testing.assert_allclose(grad_BTC[0], marginals_TC - one_hot_TC, atol=1e-5)


def test_module_params_init_to_zeros_with_logical_axes():
    crf = CRF(num_labels=5)
    emissions_BTC = jnp.zeros((2, 3, 5))
    mask_BT = jnp.ones((2, 3), bool)
    variables = jax.jit(lambda key: crf.init(key, emissions_BTC, mask_BT, method=CRF.decode))(jax.random.PRNGKey(0))
    boxed = variables["params"]
    assert boxed["transitions"].names == (None, None)
    assert boxed["start"].names == (None,) and boxed["end"].names == (None,)
    params = nn.meta.unbox(boxed)
    assert params["transitions"].shape == (5, 5)
    assert params["start"].shape == (5,) and params["end"].shape == (5,)
    for value in params.values():
        assert value.dtype == jnp.float32
        assert not np.asarray(value).any()


def test_module_usable_from_parent_compact_module():
    class Tagger(nn.Module):
        @nn.compact
        def __call__(self, emissions_BTC, tags_BT, mask_BT):
            crf = CRF(C, name="crf")
            return crf.log_likelihood(emissions_BTC, tags_BT, mask_BT), crf.decode(emissions_BTC, mask_BT)

    emissions_BTC = jnp.asarray(np.random.default_rng(8).normal(size=(2, 5, C)), jnp.float32)
    tags_BT = jnp.zeros((2, 5), jnp.int32)
    mask_BT = jnp.asarray([[1, 0, 1, 1, 0], [1, 1, 0, 0, 0]], bool)
    variables = jax.jit(Tagger().init)(jax.random.PRNGKey(0), emissions_BTC, tags_BT, mask_BT)
    assert set(variables["params"]["crf"]) == {"transitions", "start", "end"}
    log_likelihood_B, decoded_BT = jax.jit(Tagger().apply)(variables, emissions_BTC, tags_BT, mask_BT)
    assert log_likelihood_B.shape == (2,) and decoded_BT.shape == (2, 5)
    assert np.isfinite(np.asarray(log_likelihood_B)).all()
