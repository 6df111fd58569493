"""model.cpu_tuning: the CPU-only program changes compute the same function, and only CPU programs get them."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax.models import cpu_tuning
from llm_jax.models.families import build_model
from llm_jax.models.model_config import ModelConfig

VOCAB = 40
CONFIGS = {
    "decoder_layernorm": dict(family="decoder", norm="layernorm", num_layers=3),
    "decoder_rmsnorm_rope": dict(family="decoder", norm="rmsnorm", positional="rope", num_layers=2),
    "encoder_post_ln": dict(family="encoder", norm_position="post", use_bias=True, embedding_norm=True,
                            type_vocab_size=2, heads=("mlm",), num_layers=2),
}


def _model(setting: str, **changes) -> nn.Module:
    values = dict(vocab_size=VOCAB, padded_vocab_size=128, num_heads=2, d_model=32, max_len=16, cpu_tuning=setting)
    return build_model(ModelConfig(**{**values, **changes}))


def _loss_fn(model: nn.Module, tokens_BT: jax.Array):
    head = model.config.heads[0]

    def loss(params):
        logits_BTV = model.apply({"params": params}, tokens_BT).heads[head].astype(jnp.float32)
        return jax.nn.log_softmax(logits_BTV[..., :VOCAB]).mean()

    return loss


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_on_and_off_give_the_same_loss_and_gradients(name):
    tokens_BT = jax.random.randint(jax.random.key(1), (3, 16), 0, VOCAB)
    on, off = _model("on", **CONFIGS[name]), _model("off", **CONFIGS[name])
    params = nn.unbox(on.init(jax.random.key(0), tokens_BT)["params"])
    loss_on, grads_on = jax.jit(jax.value_and_grad(_loss_fn(on, tokens_BT)))(params)
    loss_off, grads_off = jax.jit(jax.value_and_grad(_loss_fn(off, tokens_BT)))(params)
    np.testing.assert_allclose(loss_on, loss_off, rtol=1e-6)
    for path, g_on in jax.tree_util.tree_leaves_with_path(grads_on):
        g_off = dict(jax.tree_util.tree_leaves_with_path(grads_off))[path]
        np.testing.assert_allclose(g_on, g_off, rtol=2e-4, atol=2e-6, err_msg=jax.tree_util.keystr(path))


def _program(setting: str) -> str:
    model = _model(setting, **CONFIGS["decoder_layernorm"])
    tokens_BT = jnp.zeros((2, 16), jnp.int32)
    params = nn.unbox(model.init(jax.random.key(0), tokens_BT)["params"])
    return str(jax.make_jaxpr(jax.grad(_loss_fn(model, tokens_BT)))(params))


def test_auto_follows_the_backend(monkeypatch):
    on, off = _program("on"), _program("off")
    assert "optimization_barrier" in on and "optimization_barrier" not in off
    assert _program("auto") == on  # the suite runs on the CPU
    monkeypatch.setattr(cpu_tuning.jax, "default_backend", lambda: "gpu")
    assert not cpu_tuning.cpu_tuned("auto")
    assert _program("auto") == off


def test_forward_mode_autodiff_works_without_the_cpu_changes():
    """jax.jvp through the model (e.g. for Hessian-vector products) needs the plain program."""
    model = _model("off", **CONFIGS["decoder_layernorm"])
    tokens_BT = jnp.zeros((2, 16), jnp.int32)
    params = nn.unbox(model.init(jax.random.key(0), tokens_BT)["params"])
    loss = _loss_fn(model, tokens_BT)
    tangent = jax.tree.map(jnp.ones_like, params)
    _, directional = jax.jvp(loss, (params,), (tangent,))
    grads = jax.grad(loss)(params)
    expected = sum(jnp.sum(g) for g in jax.tree.leaves(grads))
    np.testing.assert_allclose(directional, expected, rtol=1e-4)
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(_loss_fn(_model("on", **CONFIGS["decoder_layernorm"]), tokens_BT), (params,), (tangent,))
