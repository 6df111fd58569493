"""The prefix-LM attention mask (model.attention_mask=prefix_lm): the mask itself, cached decoding, SFT rows and
training, and the config errors."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.model_sizes import apply_model_size
from conftest import metrics, run_module
from llm_jax import config as config_lib
from llm_jax.decoding.engine import DecodeOptions, build_engine
from llm_jax.errors import ConfigError
from llm_jax.models.attention_kernels import check_attention_impl
from llm_jax.models.families import build_model
from llm_jax.models.model_config import build_model_config
from llm_jax.tasks import build_task
from test_sft import _config, _expected_pairs, _rows

pytestmark = pytest.mark.slow  # run with --slow (README); the default suite stays under 15 min

VOCAB, MAX_LEN, T = 20, 32, 12
MESH = {"data": 1, "fsdp": 1, "tensor": 1}


def tiny(attention_mask="prefix_lm", scan_layers=False, **model):
    """(model_config, model, random params) of the 'test' size (stddev 0.3 spreads the logits)."""
    config = config_lib.default_config()
    apply_model_size(config, "test")
    config.model.update(max_len=MAX_LEN, attention_mask=attention_mask, scan_layers=scan_layers, **model)
    model_config = build_model_config(config.model, VOCAB, MESH)
    module = build_model(model_config)
    shapes = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, MAX_LEN), jnp.int32))["params"])
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda leaf: jnp.asarray(0.3 * rng.normal(size=leaf.shape), leaf.dtype), shapes)
    return model_config, module, params


@pytest.fixture(scope="module")
def prefix_model():
    return tiny()


def logits(module, params, tokens_T, prefix_T=None, segment_ids_T=None):
    as_batch = lambda x: None if x is None else jnp.asarray(np.asarray(x)[None], jnp.int32)  # noqa: E731
    outputs = module.apply({"params": params}, as_batch(tokens_T), segment_ids_BT=as_batch(segment_ids_T),
                           prefix_BT=as_batch(prefix_T))
    return np.asarray(outputs.heads["lm"][0, :, :VOCAB])


def changed(tokens_T, t):
    other = np.array(tokens_T)
    other[t] = (other[t] + 1) % VOCAB
    return other


@pytest.mark.parametrize("scan_layers", [False, True])
def test_prefix_reads_the_whole_prefix_and_the_rest_is_causal(scan_layers):
    _, module, params = tiny(scan_layers=scan_layers)
    P = 5
    tokens_T = np.random.default_rng(0).integers(0, VOCAB, T)
    prefix_T = (np.arange(T) < P).astype(np.int32)
    base = logits(module, params, tokens_T, prefix_T)
    late_prefix = logits(module, params, changed(tokens_T, P - 1), prefix_T)
    assert not np.allclose(base[:P - 1], late_prefix[:P - 1], atol=1e-5)  # earlier prefix positions see it
    for t in (P, T - 2):  # a token after the prefix: no earlier position sees it
        after = logits(module, params, changed(tokens_T, t), prefix_T)
        np.testing.assert_allclose(base[:t], after[:t], atol=1e-5)
        assert not np.allclose(base[t:], after[t:], atol=1e-5)


def test_an_empty_prefix_is_the_causal_model(prefix_model):
    _, module, params = prefix_model
    _, causal_module, _ = tiny("causal")
    tokens_T = np.random.default_rng(1).integers(0, VOCAB, T)
    expected = logits(causal_module, params, tokens_T)
    np.testing.assert_allclose(logits(module, params, tokens_T, np.zeros(T)), expected, atol=1e-5)
    np.testing.assert_allclose(logits(module, params, tokens_T), expected, atol=1e-5)  # no prefix given
    # a causal model ignores a prefix: its program is the causal one
    np.testing.assert_allclose(logits(causal_module, params, tokens_T, np.ones(T)), expected, atol=1e-5)


def test_packed_segments_do_not_attend_across(prefix_model):
    _, module, params = prefix_model
    tokens_T = np.random.default_rng(2).integers(0, VOCAB, T)
    segment_ids_T = np.array([1] * 6 + [2] * 6)
    prefix_T = np.array([1, 1, 1, 0, 0, 0, 1, 1, 0, 0, 0, 0])
    base = logits(module, params, tokens_T, prefix_T, segment_ids_T)
    first_prefix = logits(module, params, changed(tokens_T, 1), prefix_T, segment_ids_T)
    np.testing.assert_allclose(base[6:], first_prefix[6:], atol=1e-5)  # segment 2 never reads segment 1
    assert not np.allclose(base[0], first_prefix[0], atol=1e-5)  # but its own prefix does
    second_prefix = logits(module, params, changed(tokens_T, 7), prefix_T, segment_ids_T)
    np.testing.assert_allclose(base[:6], second_prefix[:6], atol=1e-5)  # ... and segment 1 not segment 2
    assert not np.allclose(base[6], second_prefix[6], atol=1e-5)
    # alone, segment 2 gives the same logits (positions restart per segment)
    alone = logits(module, params, tokens_T[6:], prefix_T[6:])
    np.testing.assert_allclose(base[6:], alone, atol=1e-5)


def uncached_prefix_greedy(module, params, prompt, steps):
    """Greedy decoding by full forward passes with the prompt as the prefix (filler after the row is unread:
    it is outside the prefix, after every query that matters)."""
    apply = jax.jit(lambda p, x, prefix: module.apply({"params": p}, x, prefix_BT=prefix).heads["lm"][..., :VOCAB])
    filler = np.random.default_rng(1).integers(0, VOCAB, size=MAX_LEN)
    prefix = (np.arange(MAX_LEN) < len(prompt)).astype(np.int32)[None]
    tokens = list(prompt)
    for _ in range(steps):
        window = filler.copy()
        window[:len(tokens)] = tokens
        step_logits = np.asarray(apply(params, window[None].astype(np.int32), prefix))[0, len(tokens) - 1]
        tokens.append(int(np.argmax(step_logits)))
    return tokens[len(prompt):]


def test_cached_greedy_equals_uncached_greedy():
    model_config, module, params = tiny(scan_layers=True)
    prompts = [[3, 1, 4], [1, 5, 9, 2, 6, 5, 3], [7]]
    new = build_engine(model_config).generate(params, prompts, DecodeOptions(max_new_tokens=6, temperature=0.0))
    assert new == [uncached_prefix_greedy(module, params, prompt, 6) for prompt in prompts]
    _, causal_module, _ = tiny("causal", scan_layers=True)  # the prefix changes what is decoded
    assert any(uncached_prefix_greedy(causal_module, params, p, 6) != n for p, n in zip(prompts, new))


def test_sft_rows_mark_the_prompts():
    config = _config()
    config.model.attention_mask = "prefix_lm"
    expected, found = _expected_pairs(), 0
    for row in _rows(config):
        prefix, segments, tokens = row["prefix"].tolist(), row["segment_ids"].tolist(), row["inputs"].tolist()
        assert row["prefix"].dtype == np.int32
        for segment in sorted(set(segments) - {0}):  # each segment one pair: 1 exactly on its prompt tokens
            at = [t for t, s in enumerate(segments) if s == segment]
            pair, is_response = next(pair for pair in expected if pair[0][:len(at)] == [tokens[t] for t in at])
            assert [prefix[t] for t in at] == [1 - r for r in is_response[:len(at)]]
            found += 1
        assert all(p == 0 for p, s in zip(prefix, segments) if s == 0)  # padding
    assert found == len(expected)
    assert "prefix" not in _rows(_config())[0] and "prefix" in build_task(config).batch_spec()


def test_quick_sft_trains_with_the_prefix_lm(tmp_path):
    result = run_module("llm_jax.train", "--config=experiments/sft_python_docs.py:quick", f"--workdir={tmp_path}",
                        "--config.model.attention_mask=prefix_lm", "--config.train.steps=4",
                        "--config.train.eval_every=4", "--config.train.log_every=2", "--config.train.eval_steps=1",
                        "--config.train.steps_per_dispatch=1", "--config.train.checkpoint_every=4")
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [r["train/loss"] for r in metrics(tmp_path) if "train/loss" in r]
    assert losses and all(np.isfinite(losses))


def test_bad_settings_name_the_key():
    config = config_lib.default_config()
    config.model.update(family="encoder", attention_mask="prefix_lm")
    with pytest.raises(ConfigError, match="model.attention_mask='prefix_lm' applies to model.family in"):
        build_model_config(config.model, VOCAB, MESH)
    config = config_lib.override(config_lib.default_config(), [("model.attention_mask", "prefix_lm")])
    with pytest.raises(ConfigError, match="model.attention_mask='prefix_lm'.*no prefix to mark: use "
                                          "data.objective=sft"):
        build_task(config)
    cudnn_config, _, _ = tiny(dtype="bfloat16")
    with pytest.raises(ConfigError, match="model.attention_impl='cudnn'.*cannot apply "
                                          "model.attention_mask='prefix_lm'"):
        check_attention_impl(cudnn_config.replace(attention_impl="cudnn"), backend="gpu")
    with pytest.raises(ConfigError, match="model.attention_impl='splash'.*cannot apply "
                                          "model.attention_mask='prefix_lm'"):
        check_attention_impl(cudnn_config.replace(attention_impl="splash"), backend="tpu")
