"""Model behaviour: causality for every position scheme, padded-vocabulary masking, GQA shapes."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.model_sizes import apply_model_size
from llm_jax import config as config_lib
from llm_jax.decoding.sampling import lm_logits
from llm_jax.models.embeddings import TokenEmbedding
from llm_jax.models.families import build_model
from llm_jax.models.model_config import build_model_config, padded_vocab

VOCAB = 50
ONE_DEVICE = {"data": 1, "fsdp": 1, "tensor": 1}


def tiny_model(**changes):
    config = config_lib.default_config()
    apply_model_size(config, "test")
    config.model.update(max_len=16)
    config.model.update(**changes)
    return build_model(build_model_config(config.model, VOCAB, ONE_DEVICE))


_PARAMS: dict = {}


def _init(model):
    """The parameters of `model`, initialised once per configuration and shared by the tests (they do not depend on
    the input's shape; every model is initialised on the same one, so its eagerly compiled ops are reused)."""
    if model.config not in _PARAMS:
        _PARAMS[model.config] = nn.unbox(model.init(jax.random.key(0), jnp.zeros((2, 16), jnp.int32))["params"])
    return _PARAMS[model.config]


def _apply_with_embedding_offset(model, params, tokens_BT, offset_BTD):
    """Runs the model with `offset_BTD` added to the token embeddings (a differentiable input per position)."""

    def add_offset(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, TokenEmbedding) and context.method_name == "__call__":
            return out + offset_BTD
        return out

    with nn.intercept_methods(add_offset):
        return model.apply({"params": params}, tokens_BT).heads["lm"]


@pytest.mark.parametrize("changes", [
    {"positional": "learned"},
    {"positional": "sinusoidal", "norm": "rmsnorm"},
    {"positional": "rope", "num_kv_heads": 2, "mlp": "gated", "activation": "silu"},
    {"positional": "none", "use_bias": True, "tie_embeddings": False, "activation": "gelu_tanh"},
])
def test_logits_at_t_do_not_depend_on_later_tokens(changes):
    """Gradient test: d logits[t] / d input-embedding[s] is exactly zero for every s > t, non-zero for s <= t.

    One jitted reverse-mode Jacobian gives row t = the gradient of logits[:, t].sum() for every t at once (one
    compile instead of op-by-op gradients per t), so every position is checked, not only a few."""
    model = tiny_model(**changes)
    tokens_BT = jax.random.randint(jax.random.key(1), (2, 16), 0, VOCAB)
    params = _init(model)

    @jax.jit
    def dependence_TS(params, tokens_BT):
        def logits_T(offset_BTD):
            return _apply_with_embedding_offset(model, params, tokens_BT, offset_BTD)[:, :, :VOCAB].sum(axis=(0, 2))

        jacobian_TBSD = jax.jacrev(logits_T)(jnp.zeros((2, 16, 32)))
        return jnp.abs(jacobian_TBSD).sum(axis=(1, 3))

    dependence = np.asarray(dependence_TS(params, tokens_BT))
    assert dependence.shape == (16, 16)
    for t, per_position_T in enumerate(dependence):
        assert np.all(per_position_T[t + 1:] == 0.0), f"logits at {t} depend on later positions: {per_position_T}"
        assert np.all(per_position_T[: t + 1] > 0.0), f"logits at {t} ignore earlier positions: {per_position_T}"


def test_padded_vocabulary_rows_get_zero_probability():
    model = tiny_model()
    tokens_BT = jnp.zeros((2, 16), jnp.int32)  # the shape _init ran the model on: its eager ops are compiled
    params = _init(model)
    assert params["token_embedding"]["embedding"].shape[0] == 128
    probs_BTV = jax.nn.softmax(model.apply({"params": params}, tokens_BT).heads["lm"])
    assert np.all(np.asarray(probs_BTV[..., VOCAB:]) == 0.0)
    np.testing.assert_allclose(np.asarray(probs_BTV[..., :VOCAB].sum(-1)), 1.0, rtol=1e-5)


def test_padded_vocab_divides_every_mesh_axis():
    assert padded_vocab(65, 1, {"data": 2, "fsdp": 3, "tensor": 4}) == 72
    assert padded_vocab(50257, 128, {"data": 8, "fsdp": 1, "tensor": 1}) == 50304
    assert padded_vocab(128, 128, ONE_DEVICE) == 128


def test_grouped_query_attention_has_fewer_kv_parameters():
    model = tiny_model(num_kv_heads=1)
    params = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    attention = params["block_0"]["attention"]
    assert attention["query"]["kernel"].shape == (32, 4, 8)
    assert attention["key"]["kernel"].shape == (32, 1, 8)


@pytest.mark.parametrize("center", [True, False], ids=["layernorm", "rmsnorm"])
def test_hand_written_norm_gradient_matches_autodiff(center):
    from llm_jax.models.norms import normalize

    def reference(x, scale):
        if center:
            x = x - x.mean(-1, keepdims=True)
        return x / jnp.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * scale

    x = jax.random.normal(jax.random.key(0), (3, 5, 16)) * 3 + 1
    scale = jax.random.normal(jax.random.key(1), (16,))
    weights = jax.random.normal(jax.random.key(2), (3, 5, 16))
    ours = jax.jit(jax.grad(lambda x, s: (normalize(x, s, 1e-5, center) * weights).sum(), argnums=(0, 1)))(x, scale)
    theirs = jax.jit(jax.grad(lambda x, s: (reference(x, s) * weights).sum(), argnums=(0, 1)))(x, scale)
    np.testing.assert_allclose(normalize(x, scale, 1e-5, center), reference(x, scale), rtol=1e-5, atol=1e-6)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_positions_restart_per_segment_when_only_segment_ids_are_given():
    from llm_jax.models.stack import positions_from_segments

    segments_BT = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(positions_from_segments(segments_BT, (2, 8)),
                                  [[0, 1, 2, 0, 1, 0, 0, 1], list(range(8))])
    model = tiny_model(positional="learned")
    tokens_BT = jax.random.randint(jax.random.key(3), (1, 8), 0, VOCAB)
    params = _init(model)
    logits = jax.jit(lm_logits(model))  # one compile per shape instead of one per op and shape
    packed = logits({"params": params}, tokens_BT, None, segments_BT[:1])
    alone = logits({"params": params}, tokens_BT[:, 3:5])
    np.testing.assert_allclose(packed[:, 3:5], alone, rtol=1e-5, atol=1e-5)
