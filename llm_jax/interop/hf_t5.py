"""Hugging Face T5 checkpoints (T5ForConditionalGeneration) <-> the encoder-decoder family's parameters.

T5 is pre-RMSNorm without biases, unscaled attention logits (our scale_attention_logits=False), one relative
position bias table per stack (stored on block 0's self-attention, shared by the stack's layers, as our
`attention_bias/rel_embedding`), a ReLU MLP (v1.0: wi/wo are mlp/up, mlp/down) or a gated GELU (v1.1:
wi_0/wi_1/wo are mlp/gate, mlp/up, mlp/down) and one embedding `shared` for both stacks. Projections are torch
Linear layers ([out, in] weights); q/k/v are [N*H, D] -> our [D, N, H] einsum kernels.

The LM head, as transformers 5.x computes it: `lm_head.weight` is tied to `shared.weight` unless the checkpoint
holds an lm_head that differs from it (then it is loaded untied), and the decoder's outputs are multiplied by
d_model**-0.5 when config.json's `scale_decoder_outputs` says so, else unless `tie_word_embeddings` is false
(the v1.0 / v1.1 distinction of older configs). Those map onto model.tie_embeddings and
model.scale_decoder_outputs; an export writes both entries. Shape letters as in llm_jax.interop.hf_common, plus
R relative-position buckets.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Mapping

import numpy as np
from absl import logging

from llm_jax.interop.hf_common import (HF_CONFIG, Architecture, ConfigTypes, ConversionError, ImportedTokenizer,
                                       TensorMap, check_copy_shape, check_model_type, check_required, check_shapes,
                                       check_tied, hf_value, linear_maps, maps_to_params, norm_maps,
                                       params_to_state_dict, read_json, vocab_sizes, warn_ids_outside_vocab,
                                       weight_files)
from llm_jax.models.mlp import MLPS, gated_mlp
from llm_jax.models.model_config import ModelConfig

CLASSES = ("T5ForConditionalGeneration",)
EMBEDDING, LM_HEAD = "shared.weight", "lm_head.weight"
# saved copies of `shared` (older saves) and the bias table transformers itself ignores on load
EMBEDDING_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
UNUSED = "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"
TYPES = ConfigTypes(sizes=("d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
                           "vocab_size", "relative_attention_num_buckets", "relative_attention_max_distance",
                           "n_positions"),
                    counts=("decoder_start_token_id",),
                    numbers=("layer_norm_epsilon", "dropout_rate", "initializer_factor"),
                    strings=("feed_forward_proj",))
# feed_forward_proj -> model keys, and (gated, activation) -> feed_forward_proj (transformers' "gated-gelu" is
# gelu_new, the tanh approximation)
FEED_FORWARD = {"relu": dict(mlp="relu", activation="relu"), "gated-gelu": dict(mlp="gated", activation="gelu_tanh")}
EXPORT_FEED_FORWARD = {(False, "relu"): "relu", (True, "gelu_tanh"): "gated-gelu"}
# what T5 computes, set on import and required on export
REQUIRED = dict(family="encoder_decoder", positional="t5_relative_bias", norm="rmsnorm", norm_position="pre",
                use_bias=False, scale_attention_logits=False, scale_embeddings=False, embedding_norm=False,
                type_vocab_size=0)
T5_SENTINELS = 100  # T5's <extra_id_0..99>: the ids right above its SentencePiece vocabulary
IMPORT_SEQ_LEN = 128
DEFAULT_MAX_LEN = 512  # T5 has no position table; its configs' n_positions (what llm_jax's max_len bounds)


# ----------------------------------------------------------------------------- the tensor table


def _attention_maps(cfg: ModelConfig, ours: tuple[str, ...], hf: str) -> list[TensorMap]:
    D, N, H = cfg.d_model, cfg.num_heads, cfg.head_dim
    maps = []
    for ours_name, hf_name in (("query", "q"), ("key", "k"), ("value", "v")):
        maps += linear_maps(ours + (ours_name,), f"{hf}.{hf_name}", (D,), (N, H), bias=False)
    return maps + linear_maps(ours + ("out",), f"{hf}.o", (N, H), (D,), bias=False)


def _mlp_maps(cfg: ModelConfig, ours: tuple[str, ...], hf: str) -> list[TensorMap]:
    D, F = cfg.d_model, cfg.d_ff
    inputs = (("gate", "wi_0"), ("up", "wi_1")) if gated_mlp(cfg.mlp) else (("up", "wi"),)
    maps = []
    for ours_name, hf_name in inputs:
        maps += linear_maps(ours + (ours_name,), f"{hf}.{hf_name}", (D,), (F,), bias=False)
    return maps + linear_maps(ours + ("down",), f"{hf}.wo", (F,), (D,), bias=False)


def _stack_map(cfg: ModelConfig, stack: str, num_layers: int) -> list[TensorMap]:
    """One stack's blocks (the decoder's with EncDecAttention as layer 1), bias table and final norm."""
    D = cfg.d_model
    sublayers = [("attention", "SelfAttention")] + ([("cross_attention", "EncDecAttention")] if stack == "decoder"
                                                    else [])
    maps = [TensorMap((stack, "attention_bias", "rel_embedding"),
                      f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                      (cfg.relative_attention_num_buckets, cfg.num_heads),
                      (cfg.relative_attention_num_buckets, cfg.num_heads))]
    for layer in range(num_layers):
        ours, hf = (stack, f"block_{layer}"), f"{stack}.block.{layer}.layer"
        for index, (name, hf_name) in enumerate(sublayers):
            maps += _attention_maps(cfg, ours + (name,), f"{hf}.{index}.{hf_name}")
            maps += norm_maps(ours + (f"{name}_norm",), f"{hf}.{index}.layer_norm", D, bias=False)
        maps += _mlp_maps(cfg, ours + ("mlp",), f"{hf}.{len(sublayers)}.DenseReluDense")
        maps += norm_maps(ours + ("mlp_norm",), f"{hf}.{len(sublayers)}.layer_norm", D, bias=False)
    return maps + norm_maps((stack, "final_norm"), f"{stack}.final_layer_norm", D, bias=False)


def tensor_map(cfg: ModelConfig) -> list[TensorMap]:
    """Every parameter of the T5 `cfg` with its T5ForConditionalGeneration tensor (lm_head only when untied)."""
    D, V, P = cfg.d_model, cfg.vocab_size, cfg.padded_vocab_size
    maps = [TensorMap(("token_embedding", "embedding"), EMBEDDING, (V, D), (P, D), "vocab")]
    maps += _stack_map(cfg, "encoder", cfg.num_layers) + _stack_map(cfg, "decoder", cfg.num_decoder_layers)
    if not cfg.tie_embeddings:
        maps.append(TensorMap(("decoder", "output_head", "dense", "kernel"), LM_HEAD, (V, D), (D, P),
                              "vocab_linear"))
    return maps


# ----------------------------------------------------------------------------- configs


def _feed_forward(hf_config: Mapping[str, Any], source: str) -> dict[str, str]:
    name = hf_config.get("feed_forward_proj", "relu")
    if name not in FEED_FORWARD:
        raise ConversionError(f"{source}: feed_forward_proj={name!r} is not supported; one of "
                              f"{', '.join(FEED_FORWARD)} (T5 v1.0 and v1.1)")
    return FEED_FORWARD[name]


def _lm_head_is_shared(src: str) -> bool:
    """Whether the folder's saved lm_head.weight equals shared.weight (transformers 5.x then ties them); reads
    those two tensors only."""
    from safetensors import safe_open

    found = {}
    for path in weight_files(src):
        with safe_open(path, framework="numpy") as f:
            found.update({key: f.get_tensor(key) for key in (EMBEDDING, LM_HEAD) if key in f.keys()})
    return len(found) == 2 and np.array_equal(found[EMBEDDING], found[LM_HEAD])


def _tied(tensor_names: Iterable[str] | None, source: str) -> bool:
    """model.tie_embeddings as transformers 5.x decides it: tied unless the weights hold an lm_head.weight that
    differs from shared.weight (config.json's tie_word_embeddings does not untie: 5.x always ties)."""
    if tensor_names is None or LM_HEAD not in set(tensor_names):
        return True
    return _lm_head_is_shared(os.path.dirname(os.path.abspath(source)))


def scale_decoder_outputs(hf_config: Mapping[str, Any], source: str) -> bool:
    """transformers 5.x's T5Config rule: an explicit scale_decoder_outputs entry, else
    `tie_word_embeddings is not False` (v1.0 configs scale, v1.1's tie_word_embeddings=false ones do not)."""
    scale = hf_config.get("scale_decoder_outputs")
    if scale is None:
        return hf_config.get("tie_word_embeddings") is not False
    if not isinstance(scale, bool):
        raise ConversionError(f"{source}: scale_decoder_outputs={scale!r} must be true or false")
    return scale


def model_config_from_hf(hf_config: Mapping[str, Any], vocab_pad_multiple: int = 128,
                         tensor_names: Iterable[str] | None = None, source: str = "config.json") -> dict[str, Any]:
    """ModelConfig fields of the T5 in `hf_config` (config.json as a dict); `tensor_names` (the checkpoint's)
    decide whether the LM head is tied (None: tied, as transformers builds a model without weights)."""
    check_model_type(hf_config, "t5", CLASSES, source)
    layers, heads = hf_value(hf_config, "num_layers", source, "T5"), hf_value(hf_config, "num_heads", source, "T5")
    vocab = hf_value(hf_config, "vocab_size", source, "T5")
    warn_ids_outside_vocab(hf_config, vocab, source)
    return dict(
        **REQUIRED, **_feed_forward(hf_config, source), **vocab_sizes(vocab, vocab_pad_multiple),
        pooler=False, num_layers=layers, num_decoder_layers=hf_config.get("num_decoder_layers") or layers,
        num_heads=heads, num_kv_heads=heads, d_model=hf_value(hf_config, "d_model", source, "T5"),
        d_ff=hf_value(hf_config, "d_ff", source, "T5"), head_dim=hf_value(hf_config, "d_kv", source, "T5"),
        relative_attention_num_buckets=hf_config.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=hf_config.get("relative_attention_max_distance", 128),
        max_len=hf_config.get("n_positions") or DEFAULT_MAX_LEN,
        norm_eps=float(hf_config.get("layer_norm_epsilon", 1e-6)), dropout=float(hf_config.get("dropout_rate", 0.1)),
        tie_embeddings=_tied(tensor_names, source), scale_decoder_outputs=scale_decoder_outputs(hf_config, source),
        heads=("lm",))


def _feed_forward_proj(cfg: ModelConfig) -> str:
    """config.json's feed_forward_proj of model.mlp and the activation it computes; the error names both."""
    activation = getattr(MLPS.get(cfg.mlp), "keywords", {}).get("activation") or cfg.activation
    name = EXPORT_FEED_FORWARD.get((gated_mlp(cfg.mlp), activation))
    if name is None:
        raise ConversionError(f"model.mlp={cfg.mlp!r} with model.activation={activation!r}: T5 computes a relu MLP "
                              "(mlp=relu) or a gated gelu_tanh one (mlp=gated, activation=gelu_tanh) only")
    return name


def check_exportable(cfg: ModelConfig) -> None:
    """`cfg` is a model transformers' T5 computes exactly; the error names the model key that is not."""
    check_required(cfg, REQUIRED, "T5ForConditionalGeneration")
    if cfg.num_kv_heads != cfg.num_heads:
        raise ConversionError(f"model.num_kv_heads={cfg.num_kv_heads}: T5 has no grouped-query attention; it needs "
                              f"num_kv_heads=num_heads={cfg.num_heads}")
    if "lm" not in cfg.heads:
        raise ConversionError(f"model heads {list(cfg.heads)}: a T5ForConditionalGeneration export needs the lm head")
    _feed_forward_proj(cfg)


def hf_config_from_model(cfg: ModelConfig, special_ids: Mapping[str, int] | None = None) -> dict[str, Any]:
    """A T5Config config.json (T5ForConditionalGeneration) for the model `cfg`: the decoder starts from the
    tokenizer's pad id (0 without one), as llm_jax's does; eos is the tokenizer's when in the vocabulary."""
    check_exportable(cfg)
    special_ids = special_ids or {}
    pad, eos = special_ids.get("pad", 0), special_ids.get("eos")
    return {"architectures": list(CLASSES), "model_type": "t5", "vocab_size": cfg.vocab_size,
            "d_model": cfg.d_model, "d_kv": cfg.head_dim, "d_ff": cfg.d_ff, "num_layers": cfg.num_layers,
            "num_decoder_layers": cfg.num_decoder_layers, "num_heads": cfg.num_heads,
            "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
            "relative_attention_max_distance": cfg.relative_attention_max_distance, "n_positions": cfg.max_len,
            "dropout_rate": cfg.dropout, "layer_norm_epsilon": cfg.norm_eps,
            "feed_forward_proj": _feed_forward_proj(cfg),
            "tie_word_embeddings": cfg.tie_embeddings, "scale_decoder_outputs": cfg.scale_decoder_outputs,
            "is_encoder_decoder": True, "pad_token_id": pad, "decoder_start_token_id": pad,
            "eos_token_id": eos if isinstance(eos, int) and 0 <= eos < cfg.vocab_size else None, "dtype": "float32"}


# ----------------------------------------------------------------------------- tensors


def _ignored(name: str) -> bool:
    """A tied model's saved lm_head, saved copies of `shared`, the decoder's unused cross-attention bias table."""
    return name in (LM_HEAD, UNUSED) + EMBEDDING_COPIES


def check_tensor_shapes(shapes: Mapping[str, tuple[int, ...]], cfg: ModelConfig, source: str = "model.safetensors",
                        config_source: str = "config.json") -> None:
    """The tensors `shapes` (name -> shape) are exactly those of `cfg`; the error names the tensor and shapes."""
    check_shapes(tensor_map(cfg), shapes, _ignored, f"{cfg.num_layers} encoder and {cfg.num_decoder_layers} decoder "
                 f"layers, mlp={cfg.mlp}, tied LM head={cfg.tie_embeddings}", source, config_source)
    for key in EMBEDDING_COPIES + ((LM_HEAD,) if cfg.tie_embeddings else ()):
        check_copy_shape(shapes, key, cfg, source, config_source, EMBEDDING)


def hf_to_params(state_dict: Mapping[str, np.ndarray], cfg: ModelConfig, source: str = "model.safetensors",
                 config_source: str = "config.json") -> dict[str, Any]:
    """The encoder-decoder's parameter tree (float32 numpy, layer layout of cfg.scan_layers) from a
    T5ForConditionalGeneration state dict; vocabulary rows past vocab_size are zeros. Shapes are checked first."""
    check_tensor_shapes({name: tuple(np.shape(t)) for name, t in state_dict.items()}, cfg, source, config_source)
    for key in EMBEDDING_COPIES + ((LM_HEAD,) if cfg.tie_embeddings else ()):
        check_tied(state_dict, key, EMBEDDING, source)
    return maps_to_params(tensor_map(cfg), state_dict, cfg.scan_layers)


def params_to_hf(params: Mapping[str, Any], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """T5ForConditionalGeneration's state dict (float32, vocabulary padding sliced off; no lm_head.weight when
    tied, as transformers saves it); `params` may be in either layer layout."""
    check_exportable(cfg)
    return params_to_state_dict(tensor_map(cfg), params, "encoder_decoder")


# ----------------------------------------------------------------------------- tokenizer


def _check_decoder_start(src: str, tokenizer: Any) -> None:
    """llm_jax's decoder starts from the tokenizer's pad id (0 without one: llm_jax.decoding.encoder_decoder,
    seq2seq rows); a config.json whose decoder_start_token_id differs gets a warning (logits of given decoder
    inputs are unaffected; generation and fine-tuning start from the pad id)."""
    hf_config = read_json(os.path.join(src, HF_CONFIG))
    start = hf_config.get("decoder_start_token_id", hf_config.get("pad_token_id", 0))
    pad = getattr(tokenizer, "special_ids", {}).get("pad", 0)
    if start is not None and start != pad:
        logging.warning("%s: decoder_start_token_id=%r but llm_jax starts the decoder from the tokenizer's pad id %d: "
                        "generation and fine-tuning will start from %d", os.path.join(src, HF_CONFIG), start, pad, pad)


def import_tokenizer(src: str, cfg: ModelConfig, kind: str | None = None, path: str = "") -> ImportedTokenizer:
    """The SentencePiece model of the folder (spiece.model) or `path`; T5's vocabulary is the tokenizer's pieces,
    then its sentinels (data.num_sentinels, at most 100, the ids right above), then unused rows (32128 = 32000 +
    100 + 28 for the released models). The run config is a seq2seq fine-tuning one."""
    from llm_jax.data.tokenizers import TOKENIZERS, FileBackedTokenizer

    kind = kind or "sentencepiece"
    file_kinds = [name for name in TOKENIZERS.names() if issubclass(TOKENIZERS.get(name), FileBackedTokenizer)]
    if kind not in file_kinds:
        raise ConversionError(f"--tokenizer={kind!r}: an import reads a tokenizer file; choose one of "
                              f"{', '.join(file_kinds)}")
    path = path or os.path.join(src, "spiece.model")
    if not os.path.isfile(path):
        raise ConversionError(f"{src}: no spiece.model; pass --tokenizer_path=the SentencePiece .model of the T5 "
                              "(its pieces are the first ids of the model's vocabulary)")
    tokenizer = TOKENIZERS.get(kind).from_file(path, key="--tokenizer_path")
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ConversionError(f"--tokenizer_path={path!r}: the {kind} tokenizer has {tokenizer.vocab_size} ids but the "
                              f"model's embeddings have {cfg.vocab_size} rows; pass the T5's own tokenizer")
    _check_decoder_start(src, tokenizer)
    data = dict(tokenizer=kind, tokenizer_path=os.path.abspath(path), objective="seq2seq", pipeline="grain",
                num_sentinels=min(T5_SENTINELS, cfg.vocab_size - tokenizer.vocab_size),
                seq_len=min(IMPORT_SEQ_LEN, cfg.max_len))
    return ImportedTokenizer(tokenizer, data)


ARCHITECTURE = Architecture(
    name="T5", model_type="t5", classes=CLASSES, types=TYPES, model_config=model_config_from_hf,
    check_tensor_shapes=check_tensor_shapes, hf_to_params=hf_to_params, tokenizer=import_tokenizer,
    hf_config_from_model=hf_config_from_model, params_to_hf=params_to_hf)
