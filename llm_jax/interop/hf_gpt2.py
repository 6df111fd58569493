"""Hugging Face GPT-2 checkpoints (GPT2LMHeadModel, GPT2Model) <-> the decoder family's parameters.

GPT-2 is pre-LN with biased LayerNorms, learned positions, a standard MLP and the output tied to the token
embedding. Its projections are Conv1D layers, whose weights are [in, out] (the transpose of torch Linear's), so
they copy into our [in, ...out] kernels by a reshape; the attention's query, key and value are one fused
`c_attn` tensor [D, 3D], which the table names as three parts `c_attn.weight:query` etc. (`split_fused` and
`fuse` convert between the two). Shape letters as in llm_jax.interop.hf_common.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np

from llm_jax.interop import hf_decoder
from llm_jax.interop.hf_common import (EXPORT_ACTIVATIONS, Architecture, ConfigTypes, ConversionError, TensorMap,
                                       activation_from_hf, check_copy_shape, check_export_activation,
                                       check_full_width_heads, check_model_type, check_shapes, check_tied, hf_value,
                                       maps_to_params, norm_maps, params_to_state_dict, vocab_sizes,
                                       warn_ids_outside_vocab)
from llm_jax.models.model_config import ModelConfig

CLASSES = ("GPT2LMHeadModel", "GPT2Model")
PREFIX = "transformer."  # GPT2LMHeadModel's; GPT2Model's tensors have none
LM_HEAD = "lm_head.weight"  # a copy of wte, when saved at all
QKV = ("query", "key", "value")
TYPES = ConfigTypes(sizes=("n_embd", "n_head", "n_layer", "n_inner", "vocab_size", "n_positions"),
                    numbers=("layer_norm_epsilon", "resid_pdrop", "initializer_range"),
                    strings=("activation_function",))
# config.json flags whose other values change what the model computes: flag -> (value llm_jax computes, why)
REQUIRED_FLAGS = {"scale_attn_weights": (True, "llm_jax always scales attention logits by 1/sqrt(head_dim)"),
                  "scale_attn_by_inverse_layer_idx": (False, "llm_jax has no per-layer attention scaling"),
                  "add_cross_attention": (False, "only decoder-only GPT-2s convert"),
                  "tie_word_embeddings": (True, "GPT-2's output projection is the token embedding")}
FLAG_DEFAULTS = {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False,
                 "tie_word_embeddings": True}
REQUIRED = dict(positional="learned", norm="layernorm", mlp="standard", use_bias=True, tie_embeddings=True)
ACTIVATION_NAMES = {**EXPORT_ACTIVATIONS, "gelu_tanh": "gelu_new"}  # GPT-2's own name for its tanh gelu


def _conv1d(path: tuple[str, ...], hf_name: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...],
            part: str = "") -> list[TensorMap]:
    """A Conv1D ([in, out] weight, [out] bias) as a kernel [*in, *out] and bias [*out]: the same values."""
    n_in, n_out = int(np.prod(in_shape)), int(np.prod(out_shape))
    return [TensorMap(path + ("kernel",), f"{hf_name}.weight{part}", (n_in, n_out), in_shape + out_shape),
            TensorMap(path + ("bias",), f"{hf_name}.bias{part}", (n_out,), out_shape)]


def _block_map(cfg: ModelConfig, layer: int, prefix: str) -> list[TensorMap]:
    D, N, H, F = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.d_ff
    ours, hf = (f"block_{layer}",), f"{prefix}h.{layer}."
    maps = norm_maps(ours + ("attention_norm",), f"{hf}ln_1", D)
    for name in QKV:
        maps += _conv1d(ours + ("attention", name), f"{hf}attn.c_attn", (D,), (N, H), part=f":{name}")
    maps += _conv1d(ours + ("attention", "out"), f"{hf}attn.c_proj", (N, H), (D,))
    maps += norm_maps(ours + ("mlp_norm",), f"{hf}ln_2", D)
    maps += _conv1d(ours + ("mlp", "up"), f"{hf}mlp.c_fc", (D,), (F,))
    maps += _conv1d(ours + ("mlp", "down"), f"{hf}mlp.c_proj", (F,), (D,))
    return maps


def tensor_map(cfg: ModelConfig, prefix: str = PREFIX) -> list[TensorMap]:
    """Every parameter of the GPT-2 `cfg` with its transformers tensor (fused c_attn as three parts); `prefix` is
    "transformer." for GPT2LMHeadModel, "" for GPT2Model."""
    D, V, P = cfg.d_model, cfg.vocab_size, cfg.padded_vocab_size
    maps = [TensorMap(("token_embedding", "embedding"), f"{prefix}wte.weight", (V, D), (P, D), "vocab"),
            TensorMap(("position_embedding", "embedding"), f"{prefix}wpe.weight", (cfg.max_len, D), (cfg.max_len, D))]
    for layer in range(cfg.num_layers):
        maps += _block_map(cfg, layer, prefix)
    return maps + norm_maps(("final_norm",), f"{prefix}ln_f", D)


def _fused_map(maps: list[TensorMap]) -> list[TensorMap]:
    """`maps` with each three-part c_attn tensor as the one fused tensor the checkpoint holds (for shape checks)."""
    fused: dict[str, TensorMap] = {}
    for m in maps:
        key, _, part = m.hf_key.partition(":")
        if not part:
            fused[key] = m
        elif key in fused:
            previous = fused[key]
            fused[key] = TensorMap((), key, previous.hf_shape[:-1] + (previous.hf_shape[-1] + m.hf_shape[-1],), ())
        else:
            fused[key] = TensorMap((), key, m.hf_shape, ())
    return list(fused.values())


def split_fused(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`state_dict` with every c_attn weight [D, 3D] and bias [3D] split into `:query`, `:key`, `:value` parts."""
    out = {}
    for name, tensor in state_dict.items():
        if ".attn.c_attn." in name:
            out.update({f"{name}:{part}": piece for part, piece in zip(QKV, np.split(np.asarray(tensor), 3, -1))})
        else:
            out[name] = tensor
    return out


def fuse(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inverse of `split_fused`: the three parts of each c_attn tensor concatenated on the last axis."""
    out = {name: tensor for name, tensor in tensors.items() if ":" not in name}
    for name in {name.partition(":")[0] for name in tensors if ":" in name}:
        out[name] = np.ascontiguousarray(np.concatenate([tensors[f"{name}:{part}"] for part in QKV], -1))
    return out


# ----------------------------------------------------------------------------- configs


def check_hf_config(hf_config: Mapping[str, Any], source: str = "config.json") -> None:
    """A GPT-2 config this converter maps exactly; one-line errors naming `source` and the entry."""
    check_model_type(hf_config, "gpt2", CLASSES, source)
    for flag, (value, why) in REQUIRED_FLAGS.items():
        if bool(hf_config.get(flag, FLAG_DEFAULTS[flag])) != value:
            raise ConversionError(f"{source}: {flag}={hf_config[flag]!r} is not supported ({why}); only "
                                  f"{flag}={str(value).lower()} converts")
    activation_from_hf({"activation_function": "gelu_new", **hf_config}, "activation_function", source, "GPT-2")
    width, heads = hf_value(hf_config, "n_embd", source, "GPT-2"), hf_value(hf_config, "n_head", source, "GPT-2")
    if width % heads:
        raise ConversionError(f"{source}: n_head={heads} does not divide n_embd={width}")


def prefix_of(tensor_names: Iterable[str]) -> str:
    """"transformer." when the tensors are GPT2LMHeadModel's, "" for a bare GPT2Model's."""
    return PREFIX if any(name.startswith(PREFIX) for name in tensor_names) else ""


def model_config_from_hf(hf_config: Mapping[str, Any], vocab_pad_multiple: int = 128,
                         tensor_names: Iterable[str] | None = None, source: str = "config.json") -> dict[str, Any]:
    """ModelConfig fields of the GPT-2 in `hf_config` (config.json as a dict). reorder_and_upcast_attn only changes
    the float16 rounding of transformers' attention, so either value converts."""
    check_hf_config(hf_config, source)
    width, heads = hf_config["n_embd"], hf_config["n_head"]
    vocab = hf_value(hf_config, "vocab_size", source, "GPT-2")
    warn_ids_outside_vocab(hf_config, vocab, source)
    return dict(
        **hf_decoder.DECODER_KEYS, **REQUIRED, **vocab_sizes(vocab, vocab_pad_multiple),
        num_layers=hf_value(hf_config, "n_layer", source, "GPT-2"), num_heads=heads, num_kv_heads=heads,
        d_model=width, d_ff=hf_config.get("n_inner") or 4 * width, head_dim=width // heads,
        max_len=hf_value(hf_config, "n_positions", source, "GPT-2"),
        norm_eps=float(hf_config.get("layer_norm_epsilon", 1e-5)),
        activation=activation_from_hf({"activation_function": "gelu_new", **hf_config}, "activation_function",
                                      source, "GPT-2"),
        dropout=float(hf_config.get("resid_pdrop", 0.1)), init_std=float(hf_config.get("initializer_range", 0.02)),
        heads=("lm",))


def check_exportable(cfg: ModelConfig) -> None:
    """`cfg` is a model transformers' GPT-2 computes exactly; the error names the model key that is not."""
    hf_decoder.check_decoder_exportable(cfg, REQUIRED, "GPT2LMHeadModel")
    check_export_activation(cfg, ACTIVATION_NAMES, "activation_function", "GPT-2")
    check_full_width_heads(cfg, "GPT-2")


def hf_config_from_model(cfg: ModelConfig, special_ids: Mapping[str, int] | None = None) -> dict[str, Any]:
    """A GPT2Config config.json (GPT2LMHeadModel) for the model `cfg`; bos/eos from the tokenizer's `special_ids`."""
    check_exportable(cfg)
    return {"architectures": [CLASSES[0]], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
            "n_positions": cfg.max_len, "n_embd": cfg.d_model, "n_layer": cfg.num_layers, "n_head": cfg.num_heads,
            "n_inner": cfg.d_ff, "activation_function": ACTIVATION_NAMES[cfg.activation],
            "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": 0.0,
            "layer_norm_epsilon": cfg.norm_eps, "initializer_range": cfg.init_std, "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
            "tie_word_embeddings": True, **hf_decoder.eos_ids(special_ids or {}, cfg.vocab_size), "dtype": "float32"}


# ----------------------------------------------------------------------------- tensors


def _ignored(name: str) -> bool:
    """The tied output copy and the attention-mask buffers older transformers saved."""
    return name == LM_HEAD or name.endswith((".attn.bias", ".attn.masked_bias"))


def check_tensor_shapes(shapes: Mapping[str, tuple[int, ...]], cfg: ModelConfig, source: str = "model.safetensors",
                        config_source: str = "config.json") -> None:
    """The tensors `shapes` (name -> shape) are exactly those of `cfg`; the error names the tensor and shapes."""
    prefix = prefix_of(shapes)
    check_shapes(_fused_map(tensor_map(cfg, prefix)), shapes, _ignored, f"{cfg.num_layers} layers, d_model "
                 f"{cfg.d_model}", source, config_source)
    check_copy_shape(shapes, LM_HEAD, cfg, source, config_source, f"{prefix}wte.weight")


def hf_to_params(state_dict: Mapping[str, np.ndarray], cfg: ModelConfig, source: str = "model.safetensors",
                 config_source: str = "config.json") -> dict[str, Any]:
    """The decoder's parameter tree (float32 numpy, layer layout of cfg.scan_layers) from a transformers GPT-2 state
    dict (GPT2LMHeadModel's or GPT2Model's); vocabulary rows past vocab_size are zeros. Shapes are checked first."""
    check_tensor_shapes({name: tuple(np.shape(t)) for name, t in state_dict.items()}, cfg, source, config_source)
    prefix = prefix_of(state_dict)
    check_tied(state_dict, LM_HEAD, f"{prefix}wte.weight", source)
    return maps_to_params(tensor_map(cfg, prefix), split_fused(state_dict), cfg.scan_layers)


def params_to_hf(params: Mapping[str, Any], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """GPT2LMHeadModel's state dict (float32, vocabulary padding sliced off, without the tied lm_head.weight that
    transformers does not save either); `params` may be in either layer layout."""
    check_exportable(cfg)
    return fuse(params_to_state_dict(tensor_map(cfg, PREFIX), params, "decoder"))


def import_tokenizer(src: str, cfg: ModelConfig, kind: str | None = None, path: str = "") -> Any:
    return hf_decoder.import_tokenizer(
        src, cfg, kind, path, default_kind="gpt2_bpe", folder_file="",
        hint="transformers' vocab.json/merges.txt are not read: pass --tokenizer_path=GPT-2's tiktoken ranks file "
             "(e.g. ../shared/data/gpt2.tiktoken), or --tokenizer=sentencepiece --tokenizer_path=MODEL for another "
             "vocabulary")


ARCHITECTURE = Architecture(
    name="GPT-2", model_type="gpt2", classes=CLASSES, types=TYPES, model_config=model_config_from_hf,
    check_tensor_shapes=check_tensor_shapes, hf_to_params=hf_to_params, tokenizer=import_tokenizer,
    hf_config_from_model=hf_config_from_model, params_to_hf=params_to_hf)
