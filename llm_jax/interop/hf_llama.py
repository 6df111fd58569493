"""Hugging Face Llama checkpoints (LlamaForCausalLM) <-> the decoder family's parameters.

Llama is pre-RMSNorm without biases, rotary positions in the rotate_half layout (pairs i, i + H/2, as
llm_jax.models.positions.apply_rope rotates them), a SwiGLU MLP (gate_proj/up_proj/down_proj are our
mlp/gate, mlp/up, mlp/down) and grouped-query attention; the output projection is untied unless
tie_word_embeddings. Projections are torch Linear layers ([out, in] weights). Shape letters as in
llm_jax.interop.hf_common.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np

from llm_jax.interop import hf_decoder
from llm_jax.interop.hf_common import (EXPORT_ACTIVATIONS, Architecture, ConfigTypes, ConversionError, TensorMap,
                                       activation_from_hf, check_copy_shape, check_export_activation,
                                       check_model_type, check_shapes, check_tied, hf_value,
                                       linear_maps, maps_to_params, norm_maps, params_to_state_dict, vocab_sizes,
                                       warn_ids_outside_vocab)
from llm_jax.models.model_config import ModelConfig

CLASSES = ("LlamaForCausalLM",)
LM_HEAD, EMBEDDING = "lm_head.weight", "model.embed_tokens.weight"
TYPES = ConfigTypes(sizes=("hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers",
                           "intermediate_size", "vocab_size", "max_position_embeddings", "head_dim"),
                    numbers=("rms_norm_eps", "rope_theta", "initializer_range", "attention_dropout"),
                    strings=("hidden_act",))
ROPE_TYPES = (None, "default")  # what apply_rope computes; linear, dynamic, yarn, llama3 ... scale the angles
REQUIRED = dict(positional="rope", norm="rmsnorm", mlp="gated", use_bias=False)


def _block_map(cfg: ModelConfig, layer: int) -> list[TensorMap]:
    D, N, K, H, F = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_ff
    ours, hf = (f"block_{layer}",), f"model.layers.{layer}."
    maps = norm_maps(ours + ("attention_norm",), f"{hf}input_layernorm", D, bias=False)
    maps += linear_maps(ours + ("attention", "query"), f"{hf}self_attn.q_proj", (D,), (N, H), bias=False)
    maps += linear_maps(ours + ("attention", "key"), f"{hf}self_attn.k_proj", (D,), (K, H), bias=False)
    maps += linear_maps(ours + ("attention", "value"), f"{hf}self_attn.v_proj", (D,), (K, H), bias=False)
    maps += linear_maps(ours + ("attention", "out"), f"{hf}self_attn.o_proj", (N, H), (D,), bias=False)
    maps += norm_maps(ours + ("mlp_norm",), f"{hf}post_attention_layernorm", D, bias=False)
    for ours_name, hf_name in (("gate", "gate_proj"), ("up", "up_proj")):
        maps += linear_maps(ours + ("mlp", ours_name), f"{hf}mlp.{hf_name}", (D,), (F,), bias=False)
    maps += linear_maps(ours + ("mlp", "down"), f"{hf}mlp.down_proj", (F,), (D,), bias=False)
    return maps


def tensor_map(cfg: ModelConfig) -> list[TensorMap]:
    """Every parameter of the Llama `cfg` with its LlamaForCausalLM tensor (lm_head only when untied)."""
    D, V, P = cfg.d_model, cfg.vocab_size, cfg.padded_vocab_size
    maps = [TensorMap(("token_embedding", "embedding"), EMBEDDING, (V, D), (P, D), "vocab")]
    for layer in range(cfg.num_layers):
        maps += _block_map(cfg, layer)
    maps += norm_maps(("final_norm",), "model.norm", D, bias=False)
    if not cfg.tie_embeddings:
        maps.append(TensorMap(("output_head", "dense", "kernel"), LM_HEAD, (V, D), (D, P), "vocab_linear"))
    return maps


# ----------------------------------------------------------------------------- configs


def _rope(hf_config: Mapping[str, Any], source: str) -> float:
    """rope_theta of config.json (transformers 5's rope_parameters, or the older rope_theta/rope_scaling entries);
    a scaled RoPE is an error."""
    parameters = hf_config.get("rope_parameters") or {}
    scaling = hf_config.get("rope_scaling") or {}
    if not isinstance(parameters, dict) or not isinstance(scaling, dict):
        raise ConversionError(f"{source}: rope_parameters/rope_scaling must be objects of settings")
    for key, values in (("rope_parameters", parameters), ("rope_scaling", scaling)):
        rope_type = values.get("rope_type", values.get("type"))
        if rope_type not in ROPE_TYPES:
            raise ConversionError(f"{source}: {key} rope_type={rope_type!r} is not supported; only the default "
                                  "(unscaled) RoPE converts: llm_jax has no RoPE scaling")
    theta = parameters.get("rope_theta", hf_config.get("rope_theta", 10000.0))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
        raise ConversionError(f"{source}: rope_theta={theta!r} must be a positive number")
    return float(theta)


def check_hf_config(hf_config: Mapping[str, Any], source: str = "config.json") -> None:
    """A Llama config this converter maps exactly; one-line errors naming `source` and the entry."""
    check_model_type(hf_config, "llama", CLASSES, source)
    for flag in ("attention_bias", "mlp_bias"):
        if hf_config.get(flag):
            raise ConversionError(f"{source}: {flag}=true is not supported; only bias-free Llamas convert")
    activation_from_hf({"hidden_act": "silu", **hf_config}, "hidden_act", source, "Llama")
    _rope(hf_config, source)
    heads = hf_value(hf_config, "num_attention_heads", source, "Llama")
    kv_heads = hf_config.get("num_key_value_heads") or heads
    if heads % kv_heads:
        raise ConversionError(f"{source}: num_key_value_heads={kv_heads} does not divide num_attention_heads={heads}")
    width = hf_value(hf_config, "hidden_size", source, "Llama")
    if not hf_config.get("head_dim") and width % heads:
        raise ConversionError(f"{source}: num_attention_heads={heads} does not divide hidden_size={width} (and "
                              "there is no head_dim entry)")


def model_config_from_hf(hf_config: Mapping[str, Any], vocab_pad_multiple: int = 128,
                         tensor_names: Iterable[str] | None = None, source: str = "config.json") -> dict[str, Any]:
    """ModelConfig fields of the Llama in `hf_config` (config.json as a dict)."""
    check_hf_config(hf_config, source)
    width, heads = hf_config["hidden_size"], hf_config["num_attention_heads"]
    vocab = hf_value(hf_config, "vocab_size", source, "Llama")
    warn_ids_outside_vocab(hf_config, vocab, source)
    return dict(
        **hf_decoder.DECODER_KEYS, **REQUIRED, **vocab_sizes(vocab, vocab_pad_multiple),
        num_layers=hf_value(hf_config, "num_hidden_layers", source, "Llama"), num_heads=heads,
        num_kv_heads=hf_config.get("num_key_value_heads") or heads, d_model=width,
        d_ff=hf_value(hf_config, "intermediate_size", source, "Llama"),
        head_dim=hf_config.get("head_dim") or width // heads,
        max_len=hf_value(hf_config, "max_position_embeddings", source, "Llama"), rope_base=_rope(hf_config, source),
        norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
        activation=activation_from_hf({"hidden_act": "silu", **hf_config}, "hidden_act", source, "Llama"),
        dropout=float(hf_config.get("attention_dropout", 0.0)),
        tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        init_std=float(hf_config.get("initializer_range", 0.02)), heads=("lm",))


def check_exportable(cfg: ModelConfig) -> None:
    """`cfg` is a model transformers' Llama computes exactly; the error names the model key that is not."""
    hf_decoder.check_decoder_exportable(cfg, REQUIRED, "LlamaForCausalLM")
    check_export_activation(cfg, EXPORT_ACTIVATIONS, "hidden_act", "Llama")


def hf_config_from_model(cfg: ModelConfig, special_ids: Mapping[str, int] | None = None) -> dict[str, Any]:
    """A LlamaConfig config.json (LlamaForCausalLM) for the model `cfg`; bos/eos from the tokenizer's ids."""
    check_exportable(cfg)
    return {"architectures": list(CLASSES), "model_type": "llama", "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
            "hidden_act": EXPORT_ACTIVATIONS[cfg.activation], "max_position_embeddings": cfg.max_len,
            "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_base,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base}, "attention_bias": False,
            "mlp_bias": False, "attention_dropout": cfg.dropout, "tie_word_embeddings": cfg.tie_embeddings,
            "initializer_range": cfg.init_std, **hf_decoder.eos_ids(special_ids or {}, cfg.vocab_size),
            "dtype": "float32"}


# ----------------------------------------------------------------------------- tensors


def _ignored(name: str) -> bool:
    """RoPE's inverse-frequency buffer (older saves), and a tied model's saved copy of the embedding."""
    return name.endswith("rotary_emb.inv_freq") or name == LM_HEAD


def check_tensor_shapes(shapes: Mapping[str, tuple[int, ...]], cfg: ModelConfig, source: str = "model.safetensors",
                        config_source: str = "config.json") -> None:
    """The tensors `shapes` (name -> shape) are exactly those of `cfg`; the error names the tensor and shapes."""
    check_shapes(tensor_map(cfg), shapes, _ignored, f"{cfg.num_layers} layers, {cfg.num_kv_heads} key/value heads, "
                 f"tie_word_embeddings={cfg.tie_embeddings}", source, config_source)
    check_copy_shape(shapes, LM_HEAD, cfg, source, config_source, EMBEDDING)


def hf_to_params(state_dict: Mapping[str, np.ndarray], cfg: ModelConfig, source: str = "model.safetensors",
                 config_source: str = "config.json") -> dict[str, Any]:
    """The decoder's parameter tree (float32 numpy, layer layout of cfg.scan_layers) from a LlamaForCausalLM state
    dict; vocabulary rows past vocab_size are zeros. Shapes are checked first."""
    check_tensor_shapes({name: tuple(np.shape(t)) for name, t in state_dict.items()}, cfg, source, config_source)
    if cfg.tie_embeddings:
        check_tied(state_dict, LM_HEAD, EMBEDDING, source)
    return maps_to_params(tensor_map(cfg), state_dict, cfg.scan_layers)


def params_to_hf(params: Mapping[str, Any], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """LlamaForCausalLM's state dict (float32, vocabulary padding sliced off; no lm_head.weight when tied, as
    transformers saves it); `params` may be in either layer layout."""
    check_exportable(cfg)
    return params_to_state_dict(tensor_map(cfg), params, "decoder")


def import_tokenizer(src: str, cfg: ModelConfig, kind: str | None = None, path: str = "") -> Any:
    return hf_decoder.import_tokenizer(
        src, cfg, kind, path, default_kind="sentencepiece", folder_file="tokenizer.model",
        hint="pass --tokenizer_path=a SentencePiece .model of the model's vocabulary (Llama 1/2 folders ship it as "
             "tokenizer.model; a tokenizer.json-only folder, e.g. Llama 3, has no tokenizer llm_jax reads)")


ARCHITECTURE = Architecture(
    name="Llama", model_type="llama", classes=CLASSES, types=TYPES, model_config=model_config_from_hf,
    check_tensor_shapes=check_tensor_shapes, hf_to_params=hf_to_params, tokenizer=import_tokenizer,
    hf_config_from_model=hf_config_from_model, params_to_hf=params_to_hf)
