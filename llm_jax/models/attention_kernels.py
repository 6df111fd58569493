"""Attention kernels, selected by `model.attention_impl`: the same masked softmax attention, computed by XLA's
fused dot products (`xla`, every backend), cuDNN's flash attention (`cudnn`, GPU) or Pallas splash attention
(`splash`, TPU).

Every kernel takes queries `q_BTNH`, keys and values `k_BSKH`/`v_BSKH` (K divides N: grouped-query attention),
the query and key segment ids (0 = padding; a query reads keys of its own segment), a causal flag, an
optional additive bias `bias_BNTS` (e.g. ALiBi) and, under model.attention_mask=prefix_lm, the query and key
prefix flags `q_prefix_BT`/`k_prefix_BS` (`models.attention_masks`; only `xla` takes them), and returns
`out_BTNH`. Letters: B batch, T query positions, S key positions, N query heads, K key/value heads, H head
width.

What a kernel cannot run is checked when the model config is built (`check_attention_impl`), against the
backend (`jax.default_backend()`) and the config, so a wrong choice fails before anything compiles; shape
limits that depend on the batch (sequence lengths) are checked when the model is traced, also before compile.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Protocol

import jax
import jax.numpy as jnp

from llm_jax.errors import ConfigError
from llm_jax.models.attention_masks import ATTENTION_MASKS, prefix_visible
from llm_jax.models.model_config import ModelConfig
from llm_jax.registry import Registry


class AttendFn(Protocol):
    def __call__(self, q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, *,
                 q_segments_BT: jax.Array | None, k_segments_BS: jax.Array | None, causal: bool,
                 bias_BNTS: jax.Array | None, q_prefix_BT: jax.Array | None = None,
                 k_prefix_BS: jax.Array | None = None) -> jax.Array: ...


@dataclasses.dataclass(frozen=True)
class AttentionKernel:
    """One implementation: the backends it runs on, its config checks (messages without the key) and the
    attention function."""

    backends: tuple[str, ...] | None  # jax.default_backend() names; None = every backend
    attend: AttendFn
    config_problems: Callable[[ModelConfig], list[str]] = lambda cfg: []


ATTENTION_KERNELS: Registry[AttentionKernel] = Registry("attention implementation")


def attention_mask(q_segments_BT: jax.Array | None, k_segments_BS: jax.Array | None,
                   causal: bool) -> jax.Array | None:
    """[B, 1, T, S] True where query t may read key s; causality itself is left to the kernel.

    Segment id 0 marks padding. A query reads keys of its own segment. Without causality (encoders,
    cross-attention) no query reads a padding key, and a padding query reads every real key, as BERT
    does, so padding outputs are finite and equal transformers'. (The causal mask keeps padding with
    padding: the decoder's program is unchanged, and padding targets carry no weight.)
    """
    if q_segments_BT is None or k_segments_BS is None:
        return None
    same_BTS = q_segments_BT[:, :, None] == k_segments_BS[:, None, :]
    if not causal:
        real_key_B1S = k_segments_BS[:, None, :] != 0
        same_BTS = (same_BTS | (q_segments_BT[:, :, None] == 0)) & real_key_B1S
    return same_BTS[:, None, :, :]


def prefix_lm_mask(q_segments_BT: jax.Array | None, k_segments_BS: jax.Array | None, q_prefix_BT: jax.Array,
                   k_prefix_BS: jax.Array) -> jax.Array:
    """[B, 1, T, S] mask of self-attention under the prefix LM: the causal segment mask of `attention_mask`,
    widened to every pair of prefix tokens (of the same segment)."""
    T, S = q_prefix_BT.shape[1], k_prefix_BS.shape[1]
    causal_1TS = (jnp.arange(T)[:, None] >= jnp.arange(S)[None, :])[None]
    visible_B1TS = prefix_visible(q_prefix_BT, k_prefix_BS, causal_1TS)[:, None]
    segments_B1TS = attention_mask(q_segments_BT, k_segments_BS, causal=True)
    return visible_B1TS if segments_B1TS is None else visible_B1TS & segments_B1TS


def fused_attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, *, q_segments_BT: jax.Array | None,
                    k_segments_BS: jax.Array | None, causal: bool, bias_BNTS: jax.Array | None,
                    implementation: str, q_prefix_BT: jax.Array | None = None,
                    k_prefix_BS: jax.Array | None = None) -> jax.Array:
    """`jax.nn.dot_product_attention` with the segment mask and bias; what `xla` and `cudnn` share. With prefix
    flags (prefix LM) the whole mask is explicit (`prefix_lm_mask`) and the fused causal mask is off.

    cuDNN wants the bias in the dtype of q (it adds the boolean mask to it as a large negative bias of that
    dtype); XLA adds it to the f32 logits either way, so the cast is a no-op for f32 and for ALiBi's bias,
    which is already in the compute dtype.
    """
    if q_prefix_BT is not None and k_prefix_BS is not None:
        mask_B1TS, causal = prefix_lm_mask(q_segments_BT, k_segments_BS, q_prefix_BT, k_prefix_BS), False
    else:
        mask_B1TS = attention_mask(q_segments_BT, k_segments_BS, causal)
    if bias_BNTS is not None:
        bias_BNTS = bias_BNTS.astype(q_BTNH.dtype)
    return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, bias=bias_BNTS, mask=mask_B1TS, is_causal=causal,
                                        implementation=implementation)


def refuse_prefix(impl: str, q_prefix_BT: jax.Array | None) -> None:
    """A kernel that takes no arbitrary mask fails on prefix flags (check_attention_impl stops it earlier)."""
    if q_prefix_BT is not None:
        raise ConfigError(f"model.attention_impl={impl!r} cannot apply model.attention_mask='prefix_lm': use "
                          "model.attention_impl='xla'")


def _prefix_problems(cfg: ModelConfig) -> list[str]:
    """What cudnn and splash say about a mask they cannot take (they get no arbitrary mask here)."""
    if ATTENTION_MASKS.get(cfg.attention_mask).uses_prefix:
        return [f"cannot apply model.attention_mask={cfg.attention_mask!r} (it takes no arbitrary mask here): use "
                "model.attention_mask=causal"]
    return []


def _cudnn_attend(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, *, q_segments_BT: jax.Array | None,
                  k_segments_BS: jax.Array | None, causal: bool, bias_BNTS: jax.Array | None,
                  q_prefix_BT: jax.Array | None = None, k_prefix_BS: jax.Array | None = None) -> jax.Array:
    """cuDNN flash attention. A segment mask or bias becomes one additive [B, N, T, S] bias (jax's cuDNN
    wrapper does that), which costs memory at long sequences; plain causal rows (no segments) take the fused
    causal mask alone. cuDNN needs even sequence lengths when there is a bias."""
    refuse_prefix("cudnn", q_prefix_BT)
    T, S = q_BTNH.shape[1], k_BSKH.shape[1]
    has_bias = bias_BNTS is not None or q_segments_BT is not None
    if has_bias and (T % 2 or S % 2):
        raise ConfigError(f"model.attention_impl='cudnn' with segment ids or a positional bias needs even sequence "
                          f"lengths, got {T} queries and {S} keys: make data.seq_len even or use "
                          "model.attention_impl='xla'")
    return fused_attention(q_BTNH, k_BSKH, v_BSKH, q_segments_BT=q_segments_BT, k_segments_BS=k_segments_BS,
                           causal=causal, bias_BNTS=bias_BNTS, implementation="cudnn")


def _cudnn_problems(cfg: ModelConfig) -> list[str]:
    problems = _prefix_problems(cfg)
    if cfg.dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        problems.append(f"needs model.dtype bfloat16 or float16 (cuDNN flash attention has no {cfg.dtype.name} "
                        "kernel), got model.dtype=" + repr(cfg.dtype.name))
    if cfg.head_dim % 8 or cfg.head_dim > 256:
        problems.append(f"needs a head width that is a multiple of 8 and at most 256 (128 before Hopper), got "
                        f"model.head_dim={cfg.head_dim}")
    return problems


SPLASH_BLOCKS = (512, 256, 128)  # query/key block sizes tried, largest first; the kernel needs multiples of 128


def _splash_block(length: int) -> int:
    for block in SPLASH_BLOCKS:
        if length % block == 0:
            return block
    raise ConfigError(f"model.attention_impl='splash' needs sequence lengths that are multiples of "
                      f"{SPLASH_BLOCKS[-1]}, got {length}: change data.seq_len or use model.attention_impl='xla'")


def _splash_attend(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, *, q_segments_BT: jax.Array | None,
                   k_segments_BS: jax.Array | None, causal: bool, bias_BNTS: jax.Array | None,
                   q_prefix_BT: jax.Array | None = None, k_prefix_BS: jax.Array | None = None,
                   interpret: bool = False) -> jax.Array:
    """Pallas splash attention (TPU), vmapped over the batch, with a causal (or full) mask and segment ids.

    NOT RUN in this project's CI (no TPU; `interpret=True` runs the kernel in the Pallas interpreter, which a
    test uses on CPU). Padding (segment 0) queries read only padding keys here, unlike `xla`'s encoder mask;
    real tokens see the same keys. Under a mesh that shards the batch or heads, XLA cannot partition the
    Pallas call: wrapping it in shard_map is left to the first TPU user.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    refuse_prefix("splash", q_prefix_BT)
    if bias_BNTS is not None:  # check_attention_impl stops a positional bias earlier
        raise ConfigError("model.attention_impl='splash' cannot add an attention bias; use model.attention_impl='xla'")
    (_, T, N, H), S = q_BTNH.shape, k_BSKH.shape[1]
    block_q, block_kv = _splash_block(T), _splash_block(S)
    head_mask = masks.CausalMask((T, S)) if causal else masks.FullMask((T, S))
    sizes = splash.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv, block_q_dkv=block_q,
                              block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv, block_q_dq=block_q,
                              block_kv_dq=block_kv)
    kernel = splash.make_splash_mha(masks.MultiHeadMask([head_mask] * N), block_sizes=sizes, head_shards=1,
                                    q_seq_shards=1, interpret=interpret)
    q_BNTH = jnp.swapaxes(q_BTNH * (H ** -0.5), 1, 2).astype(q_BTNH.dtype)  # splash does not scale the logits
    k_BKSH, v_BKSH = jnp.swapaxes(k_BSKH, 1, 2), jnp.swapaxes(v_BSKH, 1, 2)
    if q_segments_BT is None or k_segments_BS is None:
        out_BNTH = jax.vmap(kernel)(q_BNTH, k_BKSH, v_BKSH)
    else:
        segments = splash.SegmentIds(q=q_segments_BT.astype(jnp.int32), kv=k_segments_BS.astype(jnp.int32))
        out_BNTH = jax.vmap(kernel)(q_BNTH, k_BKSH, v_BKSH, segment_ids=segments)
    return jnp.swapaxes(out_BNTH, 1, 2)


def _splash_problems(cfg: ModelConfig) -> list[str]:
    from llm_jax.models.positions import POSITIONALS

    problems = _prefix_problems(cfg)
    if POSITIONALS.get(cfg.positional).attention_bias is not None:
        problems.append(f"cannot add the attention bias that model.positional={cfg.positional!r} needs: use "
                        "model.positional=rope (or learned, sinusoidal, none)")
    return problems


ATTENTION_KERNELS.add("xla", AttentionKernel(None, functools.partial(fused_attention, implementation="xla")))
ATTENTION_KERNELS.add("cudnn", AttentionKernel(("gpu",), _cudnn_attend, _cudnn_problems))
ATTENTION_KERNELS.add("splash", AttentionKernel(("tpu",), _splash_attend, _splash_problems))


def check_attention_impl(cfg: ModelConfig, backend: str | None = None) -> None:
    """ConfigError unless `cfg.attention_impl` runs on `backend` (default: jax.default_backend()) with this
    config; the message names the key, the backend and the choices that do run there."""
    backend = backend or jax.default_backend()
    name = cfg.attention_impl
    kernel = ATTENTION_KERNELS.get(name)
    runs_here = lambda k: k.backends is None or backend in k.backends  # noqa: E731
    runnable = [other for other in ATTENTION_KERNELS.names() if runs_here(ATTENTION_KERNELS.get(other))]
    if not runs_here(kernel):
        raise ConfigError(f"model.attention_impl={name!r} runs on the {'/'.join(kernel.backends)} backend, but "
                          f"this process's JAX backend is {backend!r}; choose one of {', '.join(runnable)} here")
    problems = kernel.config_problems(cfg)
    if problems:
        raise ConfigError(f"model.attention_impl={name!r} (backend {backend!r}) " + "; ".join(problems)
                          + f"; change those keys or choose another of {', '.join(runnable)}")


def runnable_impl(cfg: ModelConfig, backend: str | None = None) -> str:
    """`cfg.attention_impl` when it runs here, else 'xla' (for evaluating a saved run on another backend)."""
    try:
        check_attention_impl(cfg, backend)
        return cfg.attention_impl
    except ConfigError:
        return "xla"
