"""The shared stack as an encoder: bidirectional attention, padding and packed-segment masks, post-LN,
token types, pooler, heads and the positional bias hook."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax.models.attention import attention_mask
from llm_jax.models.families import build_model
from llm_jax.models.model_config import ModelConfig, model_config_from_json, model_config_to_json

VOCAB = 50


def encoder_config(**changes) -> ModelConfig:
    values = dict(family="encoder", vocab_size=VOCAB, num_layers=2, num_heads=4, d_model=32, max_len=32,
                  norm_position="post", use_bias=True, type_vocab_size=2, embedding_norm=True, pooler=True,
                  heads=("mlm", "nsp"), padded_vocab_size=128)
    return ModelConfig(**{**values, **changes})


_PARAMS: dict = {}
_APPLY: dict = {}


def init(model):
    """The parameters of `model`, initialised once per configuration and shared by the tests. They do not depend
    on the input's shape, so every model is initialised on one (2, 12) batch: applying it eagerly to that shape
    reuses the ops the initialisation compiled."""
    if model.config not in _PARAMS:
        _PARAMS[model.config] = nn.unbox(model.init(jax.random.key(0), jnp.zeros((2, 12), jnp.int32))["params"])
    return _PARAMS[model.config]


def jitted_apply(model):
    """(params, *inputs) -> outputs, jitted once per configuration: a new input shape costs one compile of the
    whole model instead of one per op, and the tests that feed the same shapes share it."""
    if model.config not in _APPLY:
        _APPLY[model.config] = jax.jit(lambda params, *inputs: model.apply({"params": params}, *inputs))
    return _APPLY[model.config]


def tokens(seed: int, shape=(2, 12)) -> jnp.ndarray:
    return jax.random.randint(jax.random.key(seed), shape, 1, VOCAB)


def test_encoder_position_depends_on_later_tokens_and_decoder_does_not():
    encoder = build_model(encoder_config())
    decoder = build_model(ModelConfig(vocab_size=VOCAB, num_layers=2, num_heads=4, d_model=32, max_len=32))
    tokens_BT = tokens(1)
    changed_BT = tokens_BT.at[:, 9].set((tokens_BT[:, 9] + 1) % VOCAB)
    for model, later_matters in ((encoder, True), (decoder, False)):
        params = init(model)
        before = model.apply({"params": params}, tokens_BT).hidden_BTD
        after = model.apply({"params": params}, changed_BT).hidden_BTD
        differs = not np.allclose(before[:, :9], after[:, :9], atol=1e-6)
        assert differs == later_matters, model.config.family


def test_padding_does_not_change_real_positions():
    model = build_model(encoder_config())
    real_BT = tokens(2, (1, 7))
    padded_BT = jnp.concatenate([real_BT, jnp.zeros((1, 5), jnp.int32)], axis=1)
    segments_BT = jnp.array([[1] * 7 + [0] * 5])
    params, apply = init(model), jitted_apply(model)
    alone = apply(params, real_BT)
    padded = apply(params, padded_BT, None, segments_BT)
    np.testing.assert_allclose(padded.hidden_BTD[:, :7], alone.hidden_BTD, atol=1e-5)
    np.testing.assert_allclose(padded.pooled_BD, alone.pooled_BD, atol=1e-5)
    assert np.all(np.isfinite(np.asarray(padded.hidden_BTD)))


def test_packed_segments_do_not_see_each_other():
    # the model and the (1, 12) packed / (1, 7) alone shapes of the padding test: its compiled applies are reused
    model = build_model(encoder_config())
    first_BT, second_BT = tokens(3, (1, 5)), tokens(4, (1, 7))
    packed_BT = jnp.concatenate([first_BT, second_BT], axis=1)
    segments_BT = jnp.array([[1] * 5 + [2] * 7])
    params, apply = init(model), jitted_apply(model)
    packed = apply(params, packed_BT, None, segments_BT).hidden_BTD
    np.testing.assert_allclose(packed[:, :5], apply(params, first_BT).hidden_BTD, atol=1e-5)
    np.testing.assert_allclose(packed[:, 5:], apply(params, second_BT).hidden_BTD, atol=1e-5)


def test_attention_mask_rules():
    segments = jnp.array([[1, 1, 2, 0]])
    bidirectional = np.asarray(attention_mask(segments, segments, causal=False)[0, 0])
    np.testing.assert_array_equal(bidirectional, [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [1, 1, 1, 0]])
    causal = np.asarray(attention_mask(segments, segments, causal=True)[0, 0])
    np.testing.assert_array_equal(causal, [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])


def test_token_types_change_the_output_and_heads_have_their_shapes():
    model = build_model(encoder_config())
    tokens_BT = tokens(5)
    params = init(model)
    assert {"token_type_embedding", "embedding_norm", "pooler", "mlm_head", "nsp_head"} <= set(params)
    assert "final_norm" not in params, "post-LN blocks end normalised"
    plain = model.apply({"params": params}, tokens_BT)
    typed = model.apply({"params": params}, tokens_BT, token_types_BT=jnp.ones_like(tokens_BT))
    assert not np.allclose(plain.hidden_BTD, typed.hidden_BTD)
    assert plain.heads["mlm"].shape == (2, 12, 128) and plain.heads["nsp"].shape == (2, 2)
    assert np.all(np.asarray(plain.heads["mlm"])[..., VOCAB:] == np.finfo(np.float32).min)


def test_post_ln_stream_is_normalised_and_pre_ln_is_not():
    tokens_BT = tokens(6)
    for position, normalised in (("post", True), ("pre", False)):
        model = build_model(encoder_config(norm_position=position, embedding_norm=False, heads=()))
        params = init(model)
        # pre-LN ends with final_norm: read the stream before it through the last block's output
        hidden = model.apply({"params": params}, tokens_BT, capture_intermediates=True, mutable=["intermediates"])
        stream = hidden[1]["intermediates"]["block_1"]["__call__"][0]
        std = np.asarray(stream).std(-1)
        assert np.allclose(std, 1.0, atol=1e-3) == normalised, position


@pytest.mark.parametrize("classifier_head", ["classifier", "token_classifier"])
def test_classification_heads(classifier_head):
    model = build_model(encoder_config(heads=(classifier_head,), num_labels=3, crf=True))
    tokens_BT = tokens(7)
    params = init(model)
    outputs = model.apply({"params": params}, tokens_BT)
    expected = (2, 3) if classifier_head == "classifier" else (2, 12, 3)
    assert outputs.heads[classifier_head].shape == expected
    assert ("crf" in params) == (classifier_head == "token_classifier")


def test_alibi_bias_hook_is_used_by_every_layer():
    model = build_model(encoder_config(positional="alibi", heads=()))
    tokens_BT = tokens(8)
    params = init(model)
    assert "position_embedding" not in params
    shifted = jnp.roll(tokens_BT, 3, axis=1)
    out = model.apply({"params": params}, tokens_BT).hidden_BTD
    out_shifted = model.apply({"params": params}, shifted).hidden_BTD
    assert not np.allclose(out, out_shifted), "with a distance bias the model sees order"
    no_position = build_model(encoder_config(positional="none", heads=()))
    unordered = no_position.apply({"params": params}, tokens_BT).hidden_BTD
    assert not np.allclose(out, unordered)


def test_model_config_round_trip_and_old_configs_load():
    config = encoder_config(crf=True, num_labels=5)
    assert model_config_from_json(model_config_to_json(config)) == config
    old = {key: value for key, value in model_config_to_json(ModelConfig(vocab_size=VOCAB)).items()
           if key not in ("norm_position", "type_vocab_size", "embedding_norm", "pooler", "num_labels", "crf",
                          "heads")}
    loaded = model_config_from_json(old)
    assert loaded.norm_position == "pre" and loaded.heads == ("lm",) and loaded.family == "decoder"
    with pytest.raises(ValueError, match="unknown keys"):
        model_config_from_json({**old, "not_a_key": 1})
