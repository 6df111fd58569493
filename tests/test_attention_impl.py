"""model.attention_impl: the kernel registry's validation (key, backend, choices, before compile), the
mask/bias plumbing the fused kernels share against a hand-written softmax attention, splash in the Pallas
interpreter on CPU, and (with --gpu) cuDNN against XLA in bfloat16."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.model_sizes import apply_model_size
from llm_jax import config as config_lib
from llm_jax.errors import ConfigError
from llm_jax.models import attention_kernels as kernels
from llm_jax.models.families import build_model
from llm_jax.models.model_config import ModelConfig, build_model_config
from llm_jax.models.positions import AlibiBias

ONE_DEVICE = {"data": 1, "fsdp": 1, "tensor": 1}
B, T, N, K, H = 2, 16, 4, 2, 8  # GQA: two query heads per key/value head


def model_config(**changes) -> ModelConfig:
    return ModelConfig(**{"vocab_size": 50, "num_heads": N, "num_kv_heads": K, "d_model": N * H, **changes})


# ---------------------------------------------------------------- validation, before anything compiles


@pytest.mark.parametrize("impl, backend", [("cudnn", "cpu"), ("cudnn", "tpu"), ("splash", "cpu"), ("splash", "gpu")])
def test_a_kernel_off_its_backend_names_the_key_the_backend_and_the_choices(impl, backend):
    with pytest.raises(ConfigError) as error:
        kernels.check_attention_impl(model_config(attention_impl=impl, dtype="bfloat16"), backend)
    message = str(error.value)
    assert f"model.attention_impl={impl!r}" in message and repr(backend) in message
    runnable = [name for name in ("cudnn", "splash", "xla") if name == "xla" or (name, backend) in
                {("cudnn", "gpu"), ("splash", "tpu")}]
    assert f"choose one of {', '.join(runnable)}" in message


def test_build_model_config_checks_this_process_backend():
    config = config_lib.default_config()
    config.model.update(attention_impl="cudnn", dtype="bfloat16")
    with pytest.raises(ConfigError, match=r"model.attention_impl='cudnn' runs on the gpu backend.*'cpu'"):
        build_model_config(config.model, 50, ONE_DEVICE)
    config.model.attention_impl = "xla"
    assert build_model_config(config.model, 50, ONE_DEVICE).attention_impl == "xla"


def test_an_unknown_kernel_fails_config_validation():
    config = config_lib.default_config()
    config.model.attention_impl = "flash"
    with pytest.raises(ConfigError, match="model.attention_impl='flash' is not one of cudnn, splash, xla"):
        config_lib.validate(config, 1)


@pytest.mark.parametrize("changes, problem", [
    ({"dtype": "float32"}, "needs model.dtype bfloat16 or float16"),
    ({"dtype": "bfloat16", "head_dim": 12}, "model.head_dim=12"),
    ({"dtype": "bfloat16", "head_dim": 512}, "model.head_dim=512"),
])
def test_cudnn_checks_dtype_and_head_width(changes, problem):
    with pytest.raises(ConfigError, match=problem):
        kernels.check_attention_impl(model_config(attention_impl="cudnn", **changes), "gpu")
    kernels.check_attention_impl(model_config(attention_impl="cudnn", dtype="float16"), "gpu")


def test_splash_refuses_a_positional_bias():
    with pytest.raises(ConfigError, match="model.positional='alibi'.*model.positional=rope"):
        kernels.check_attention_impl(model_config(attention_impl="splash", positional="alibi"), "tpu")
    kernels.check_attention_impl(model_config(attention_impl="splash", positional="rope"), "tpu")


def test_a_saved_run_read_on_another_backend_falls_back_to_xla():
    cfg = model_config(attention_impl="cudnn", dtype="bfloat16")
    assert kernels.runnable_impl(cfg, "gpu") == "cudnn"
    assert kernels.runnable_impl(cfg, "cpu") == "xla"


# ---------------------------------------------------------------- the formulation against a hand-written one


def reference_attention(q_BTNH, k_BSKH, v_BSKH, allowed_BNTS, bias_BNTS):
    """Softmax attention written out: GQA by repeating each key/value head for its query heads."""
    repeat = q_BTNH.shape[2] // k_BSKH.shape[2]
    k_BSNH, v_BSNH = jnp.repeat(k_BSKH, repeat, axis=2), jnp.repeat(v_BSKH, repeat, axis=2)
    logits_BNTS = jnp.einsum("btnh,bsnh->bnts", q_BTNH, k_BSNH) / np.sqrt(q_BTNH.shape[-1]) + bias_BNTS
    logits_BNTS = jnp.where(allowed_BNTS, logits_BNTS, -1e30)
    return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(logits_BNTS, axis=-1), v_BSNH)


def random_qkv(dtype=jnp.float32, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return tuple(jax.random.normal(key, shape, jnp.float32).astype(dtype)
                 for key, shape in zip(keys, [(B, T, N, H), (B, T, K, H), (B, T, K, H)]))


# two packed documents and padding in row 0, one document and padding in row 1
SEGMENTS_BT = jnp.asarray([[1] * 6 + [2] * 7 + [0] * 3, [1] * 12 + [0] * 4], jnp.int32)


def alibi_bias(dtype=jnp.float32):
    positions_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
    return AlibiBias(model_config(dtype=dtype)).apply({}, positions_BT)


def allowed(causal: bool):
    """Who reads whom, spelled out: same segment (padding queries of an encoder read every real key), and
    for decoders no later key."""
    q_BT1, k_B1S = SEGMENTS_BT[:, :, None], SEGMENTS_BT[:, None, :]
    if causal:
        same_BTS = (q_BT1 == k_B1S) & (jnp.arange(T)[:, None] >= jnp.arange(T)[None, :])
    else:
        same_BTS = ((q_BT1 == k_B1S) | (q_BT1 == 0)) & (k_B1S != 0)
    return jnp.broadcast_to(same_BTS[:, None], (B, N, T, T))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fused_formulation_equals_hand_written_attention(causal, with_bias):
    """What xla and cudnn run (fused_attention), here with XLA on CPU: segments, causality, ALiBi and GQA."""
    q, k, v = random_qkv()
    bias_BNTS = alibi_bias() if with_bias else None
    out = kernels.fused_attention(q, k, v, q_segments_BT=SEGMENTS_BT, k_segments_BS=SEGMENTS_BT, causal=causal,
                                  bias_BNTS=bias_BNTS, implementation="xla")
    expected = reference_attention(q, k, v, allowed(causal), 0.0 if bias_BNTS is None else bias_BNTS)
    np.testing.assert_allclose(out, expected, atol=2e-6)


def test_xla_kernel_is_the_attention_before_the_registry():
    """attention_impl=xla runs exactly the program attention ran before the kernels existed."""
    q, k, v = random_qkv()
    bias_BNTS = alibi_bias()
    before = jax.nn.dot_product_attention(q, k, v, bias=bias_BNTS, is_causal=True,
                                          mask=kernels.attention_mask(SEGMENTS_BT, SEGMENTS_BT, True))
    after = kernels.ATTENTION_KERNELS.get("xla").attend(q, k, v, q_segments_BT=SEGMENTS_BT, k_segments_BS=SEGMENTS_BT,
                                                        causal=True, bias_BNTS=bias_BNTS)
    np.testing.assert_array_equal(after, before)


def test_splash_in_the_pallas_interpreter_matches_xla():
    """The TPU kernel's plumbing (layout, scaling, segment ids, GQA, causal mask) run by the Pallas interpreter
    on CPU: real tokens match xla's output and gradient. Speed and compilation on a TPU are not tested here."""
    seq = 128  # the kernel's smallest block
    keys = jax.random.split(jax.random.key(2), 3)
    q, k, v = (jax.random.normal(key, (B, seq, heads, H)) for key, heads in zip(keys, (N, K, K)))
    segments_BT = jnp.asarray([[1] * 50 + [2] * 60 + [0] * 18, [1] * 100 + [0] * 28], jnp.int32)
    real_BT1 = (segments_BT != 0)[:, :, None, None]

    def loss(attend, q, k, v):
        out_BTNH = attend(q, k, v, q_segments_BT=segments_BT, k_segments_BS=segments_BT, causal=True, bias_BNTS=None)
        return jnp.sum(jnp.where(real_BT1, out_BTNH, 0.0) ** 2), out_BTNH

    splash = lambda *a, **kw: kernels._splash_attend(*a, **kw, interpret=True)  # noqa: E731
    (loss_splash, out_splash), grads_splash = jax.value_and_grad(loss, (1, 2, 3), has_aux=True)(splash, q, k, v)
    xla = kernels.ATTENTION_KERNELS.get("xla").attend
    (loss_xla, out_xla), grads_xla = jax.value_and_grad(loss, (1, 2, 3), has_aux=True)(xla, q, k, v)
    np.testing.assert_allclose(jnp.where(real_BT1, out_splash, 0), jnp.where(real_BT1, out_xla, 0), atol=1e-5)
    for got, want in zip(grads_splash, grads_xla):
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_splash_needs_sequences_in_blocks_of_128():
    q, k, v = random_qkv()
    with pytest.raises(ConfigError, match="multiples of 128, got 16: change data.seq_len"):
        kernels._splash_attend(q, k, v, q_segments_BT=None, k_segments_BS=None, causal=True, bias_BNTS=None,
                               interpret=True)


# ---------------------------------------------------------------- GPU: cuDNN against XLA


@pytest.mark.gpu
@pytest.mark.parametrize("causal, with_bias", [(True, False), (True, True), (False, False)])
def test_cudnn_equals_xla_in_bfloat16(causal, with_bias):
    """cuDNN flash attention against XLA, both in bfloat16 on the GPU, output and gradients; tolerance 2e-2
    (bfloat16 has 8 bits of mantissa; the kernels sum in different orders)."""
    assert jax.default_backend() == "gpu"
    q, k, v = random_qkv(jnp.bfloat16)
    bias_BNTS = alibi_bias(jnp.bfloat16) if with_bias else None

    def loss(name, q, k, v):
        out_BTNH = kernels.ATTENTION_KERNELS.get(name).attend(q, k, v, q_segments_BT=SEGMENTS_BT,
                                                              k_segments_BS=SEGMENTS_BT, causal=causal,
                                                              bias_BNTS=bias_BNTS)
        return jnp.sum(out_BTNH.astype(jnp.float32) ** 2), out_BTNH

    results = {name: jax.jit(jax.value_and_grad(loss, (1, 2, 3), has_aux=True), static_argnums=0)(name, q, k, v)
               for name in ("cudnn", "xla")}
    (_, out_cudnn), grads_cudnn = results["cudnn"]
    (_, out_xla), grads_xla = results["xla"]
    np.testing.assert_allclose(np.asarray(out_cudnn, np.float32), np.asarray(out_xla, np.float32), atol=2e-2)
    for got, want in zip(grads_cudnn, grads_xla):
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=5e-2, rtol=2e-2)


@pytest.mark.gpu
def test_cudnn_decoder_logits_equal_xla_in_bfloat16():
    """A whole bfloat16 decoder (packed segments, GQA) gives the same logits with either kernel."""
    config = config_lib.default_config()
    apply_model_size(config, "test")
    config.model.update(max_len=T, dtype="bfloat16", num_kv_heads=1)
    models = {}
    for impl in ("xla", "cudnn"):
        config.model.attention_impl = impl
        models[impl] = build_model(build_model_config(config.model, 50, ONE_DEVICE))
    tokens_BT = jax.random.randint(jax.random.key(1), (B, T), 0, 50)
    params = nn.unbox(models["xla"].init(jax.random.key(0), tokens_BT)["params"])
    logits = {impl: model.apply({"params": params}, tokens_BT, segment_ids_BT=SEGMENTS_BT).heads["lm"]
              for impl, model in models.items()}
    np.testing.assert_allclose(logits["cudnn"], logits["xla"], atol=5e-2)
