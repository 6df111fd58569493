"""Hugging Face BERT checkpoints <-> the encoder family's parameters.

One table, `tensor_map(cfg, prefix)`, pairs every encoder parameter with its transformers tensor and the
layout change between them (torch Linear weights are [out, in]; ours are [in, ...out] with heads split out,
and our vocabulary rows are padded). Import, export and the shape checks all read that table, so they
cannot disagree. Everything here works on numpy arrays: no torch, no transformers. The table names looped
blocks (`block_{i}`); a model with model.scan_layers gets and gives its stacked `blocks` through
llm_jax.models.layer_layout.

Shape letters: D model width, N heads, H head width, F MLP width, V vocabulary, P padded vocabulary.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Mapping

import numpy as np
from absl import logging

from llm_jax.interop.hf_common import (EXPORT_ACTIVATIONS, HF_ACTIVATIONS, Architecture, ConfigTypes,
                                       ConversionError, ImportedTokenizer, TensorMap, activation_from_hf,
                                       check_copy_shape, check_export_activation, check_full_width_heads,
                                       check_model_type, check_required, check_shapes, check_tied, hf_value,
                                       linear_maps, maps_to_params, norm_maps, params_to_state_dict, read_json,
                                       vocab_sizes)
from llm_jax.models.model_config import ModelConfig

FAMILY = "encoder"
# architectures -> (heads, pooler) they carry; what a checkpoint holds is read from its tensors
ARCHITECTURES = {"BertModel": ((), True), "BertForPreTraining": (("mlm", "nsp"), True),
                 "BertForMaskedLM": (("mlm",), False)}
EXPORTED_HEADS = ("mlm", "nsp")
TIED_DECODER = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")  # copies of other tensors
HF_VOCAB, HF_TOKENIZER_CONFIG = "vocab.txt", "tokenizer_config.json"
IMPORT_SEQ_LEN = 128
TYPES = ConfigTypes(sizes=("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size",
                           "vocab_size", "max_position_embeddings"), counts=("type_vocab_size",),
                    numbers=("layer_norm_eps", "hidden_dropout_prob", "initializer_range"),
                    strings=("hidden_act", "position_embedding_type"))


def _block_map(cfg: ModelConfig, layer: int, prefix: str) -> list[TensorMap]:
    D, N, H, F = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.d_ff
    ours, hf = (f"block_{layer}",), f"{prefix}encoder.layer.{layer}."
    maps = []
    for name in ("query", "key", "value"):
        maps += linear_maps(ours + ("attention", name), f"{hf}attention.self.{name}", (D,), (N, H))
    maps += linear_maps(ours + ("attention", "out"), f"{hf}attention.output.dense", (N, H), (D,))
    maps += norm_maps(ours + ("attention_norm",), f"{hf}attention.output.LayerNorm", D)
    maps += linear_maps(ours + ("mlp", "up"), f"{hf}intermediate.dense", (D,), (F,))
    maps += linear_maps(ours + ("mlp", "down"), f"{hf}output.dense", (F,), (D,))
    maps += norm_maps(ours + ("mlp_norm",), f"{hf}output.LayerNorm", D)
    return maps


def tensor_map(cfg: ModelConfig, prefix: str = "") -> list[TensorMap]:
    """Every parameter of the encoder `cfg` with its transformers tensor; `prefix` is "bert." for the
    BertFor* architectures, "" for BertModel. Heads other than mlm and nsp have no BERT tensors."""
    D, V, P = cfg.d_model, cfg.vocab_size, cfg.padded_vocab_size
    emb = f"{prefix}embeddings."
    maps = [TensorMap(("token_embedding", "embedding"), f"{emb}word_embeddings.weight", (V, D), (P, D), "vocab"),
            TensorMap(("position_embedding", "embedding"), f"{emb}position_embeddings.weight", (cfg.max_len, D),
                      (cfg.max_len, D))]
    if cfg.type_vocab_size:
        maps.append(TensorMap(("token_type_embedding", "embedding"), f"{emb}token_type_embeddings.weight",
                              (cfg.type_vocab_size, D), (cfg.type_vocab_size, D)))
    maps += norm_maps(("embedding_norm",), f"{emb}LayerNorm", D)
    for layer in range(cfg.num_layers):
        maps += _block_map(cfg, layer, prefix)
    if cfg.pooler:
        maps += linear_maps(("pooler",), f"{prefix}pooler.dense", (D,), (D,))
    if "mlm" in cfg.heads:
        maps += linear_maps(("mlm_head", "transform"), "cls.predictions.transform.dense", (D,), (D,))
        maps += norm_maps(("mlm_head", "transform_norm"), "cls.predictions.transform.LayerNorm", D)
        maps.append(TensorMap(("mlm_head", "output_bias"), "cls.predictions.bias", (V,), (P,), "vocab"))
    if "nsp" in cfg.heads:
        maps += linear_maps(("nsp_head",), "cls.seq_relationship", (D,), (2,))
    return maps


# ----------------------------------------------------------------------------- configs


def _hf_value(hf_config: Mapping[str, Any], name: str, source: str) -> Any:
    return hf_value(hf_config, name, source, "BERT")


def check_hf_config(hf_config: Mapping[str, Any], source: str = "config.json") -> None:
    """A BERT config this converter maps exactly; one-line errors naming `source` and the entry."""
    check_model_type(hf_config, "bert", ARCHITECTURES, source)
    unsupported = [name for name in hf_config.get("architectures") or () if name not in ARCHITECTURES]
    if unsupported:
        raise ConversionError(f"{source}: architectures {unsupported} are not supported; only "
                              f"{', '.join(ARCHITECTURES)} convert")
    activation_from_hf(hf_config, "hidden_act", source, "BERT")
    position_type = hf_config.get("position_embedding_type", "absolute")
    if position_type != "absolute":
        raise ConversionError(f"{source}: position_embedding_type={position_type!r} is not supported; only "
                              "'absolute' (learned positions) converts")
    for flag in ("is_decoder", "add_cross_attention"):
        if hf_config.get(flag):
            raise ConversionError(f"{source}: {flag}=true is not supported; only bidirectional encoders convert")
    width, heads = _hf_value(hf_config, "hidden_size", source), _hf_value(hf_config, "num_attention_heads", source)
    if width % heads:
        raise ConversionError(f"{source}: num_attention_heads={heads} does not divide hidden_size={width}")


def encoder_prefix(tensor_names: Iterable[str]) -> str:
    """"bert." when the tensors are a BertFor* model's, "" for a bare BertModel's."""
    return "bert." if any(name.startswith("bert.") for name in tensor_names) else ""


def heads_in(tensor_names: Iterable[str]) -> tuple[tuple[str, ...], bool]:
    """(heads, pooler) whose tensors a checkpoint holds."""
    names = list(tensor_names)
    heads = tuple(head for head, start in (("mlm", "cls.predictions."), ("nsp", "cls.seq_relationship."))
                  if any(name.startswith(start) for name in names))
    pooler = any(name.startswith(f"{encoder_prefix(names)}pooler.") for name in names)
    return heads, pooler


def model_config_from_hf(hf_config: Mapping[str, Any], vocab_pad_multiple: int = 128,
                         tensor_names: Iterable[str] | None = None, source: str = "config.json") -> dict[str, Any]:
    """ModelConfig fields of the BERT in `hf_config` (config.json as a dict). Heads and pooler come from
    `tensor_names` (what the checkpoint holds) when given, else from config.json's architectures."""
    check_hf_config(hf_config, source)
    if tensor_names is not None:
        heads, pooler = heads_in(tensor_names)
    else:
        architectures = hf_config.get("architectures") or ["BertModel"]
        heads, pooler = ARCHITECTURES[architectures[0]]
    width, num_heads = hf_config["hidden_size"], hf_config["num_attention_heads"]
    vocab = _hf_value(hf_config, "vocab_size", source)
    return dict(
        **vocab_sizes(vocab, vocab_pad_multiple), family=FAMILY,
        num_layers=_hf_value(hf_config, "num_hidden_layers", source), num_heads=num_heads, num_kv_heads=num_heads,
        d_model=width, d_ff=_hf_value(hf_config, "intermediate_size", source), head_dim=width // num_heads,
        max_len=_hf_value(hf_config, "max_position_embeddings", source), positional="learned",
        norm="layernorm", norm_position="post", norm_eps=float(hf_config.get("layer_norm_eps", 1e-12)),
        activation=HF_ACTIVATIONS[hf_config["hidden_act"]], mlp="standard", use_bias=True,
        dropout=float(hf_config.get("hidden_dropout_prob", 0.1)), tie_embeddings=True,
        type_vocab_size=int(hf_config.get("type_vocab_size", 2)), embedding_norm=True, pooler=pooler,
        init_std=float(hf_config.get("initializer_range", 0.02)), heads=heads)


def check_exportable(cfg: ModelConfig) -> None:
    """`cfg` is a model transformers' BERT computes exactly; the error names the model key that is not."""
    check_required(cfg, {"family": FAMILY, "positional": "learned", "norm": "layernorm", "norm_position": "post",
                         "mlp": "standard", "use_bias": True, "embedding_norm": True, "tie_embeddings": True}, "BERT")
    check_export_activation(cfg, EXPORT_ACTIVATIONS, "hidden_act", "BERT")
    check_full_width_heads(cfg, "BERT")
    if cfg.type_vocab_size < 1:
        raise ConversionError("model.type_vocab_size=0: BERT always has token-type embeddings; set it >= 1")
    if "nsp" in cfg.heads and ("mlm" not in cfg.heads or not cfg.pooler):
        raise ConversionError(f"model heads {list(cfg.heads)} (pooler={cfg.pooler}): an nsp head exports only "
                              "with the mlm head and the pooler (BertForPreTraining)")


def export_architecture(cfg: ModelConfig) -> str:
    """The transformers class whose tensors `params_to_hf` writes for `cfg`."""
    if "nsp" in cfg.heads:
        return "BertForPreTraining"
    return "BertForMaskedLM" if "mlm" in cfg.heads else "BertModel"


def export_config(cfg: ModelConfig) -> ModelConfig:
    """`cfg` reduced to what the BERT class of `export_architecture` holds (BertForMaskedLM has no pooler;
    heads other than mlm and nsp have no BERT tensors)."""
    heads = tuple(head for head in cfg.heads if head in EXPORTED_HEADS)
    pooler = cfg.pooler and heads != ("mlm",)
    return cfg.replace(heads=heads, pooler=pooler)


def hf_config_from_model(cfg: ModelConfig, pad_token_id: int = 0) -> dict[str, Any]:
    """A BertConfig config.json for the model `cfg` (see `export_config` for what it keeps)."""
    check_exportable(cfg)
    cfg = export_config(cfg)
    return {"architectures": [export_architecture(cfg)], "model_type": "bert", "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.d_model, "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
            "intermediate_size": cfg.d_ff, "hidden_act": EXPORT_ACTIVATIONS[cfg.activation],
            "hidden_dropout_prob": cfg.dropout, "attention_probs_dropout_prob": cfg.dropout,
            "max_position_embeddings": cfg.max_len, "type_vocab_size": cfg.type_vocab_size,
            "initializer_range": cfg.init_std, "layer_norm_eps": cfg.norm_eps, "pad_token_id": pad_token_id,
            "position_embedding_type": "absolute", "tie_word_embeddings": True, "dtype": "float32"}


# ----------------------------------------------------------------------------- tensors


def canonical_name(name: str) -> str:
    """TF-era LayerNorm names (gamma/beta) as transformers renames them on load (weight/bias)."""
    for old, new in ((".LayerNorm.gamma", ".LayerNorm.weight"), (".LayerNorm.beta", ".LayerNorm.bias")):
        if name.endswith(old):
            return name[:-len(old)] + new
    return name


def _ignored(name: str) -> bool:
    return name.endswith("embeddings.position_ids") or name in TIED_DECODER


def check_tensor_shapes(shapes: Mapping[str, tuple[int, ...]], cfg: ModelConfig, source: str = "model.safetensors",
                        config_source: str = "config.json") -> None:
    """The tensors `shapes` (canonical name -> shape) are exactly those of `cfg`; the error names `source`,
    the tensor, its shape and the one `config_source` implies, or the missing and unexpected tensors."""
    prefix = encoder_prefix(shapes)
    check_shapes(tensor_map(cfg, prefix), shapes, _ignored, f"{cfg.num_layers} layers, heads {list(cfg.heads)}",
                 source, config_source)
    check_copy_shape(shapes, TIED_DECODER[0], cfg, source, config_source, f"{prefix}embeddings'")


def hf_to_params(state_dict: Mapping[str, np.ndarray], cfg: ModelConfig, source: str = "model.safetensors",
                 config_source: str = "config.json") -> dict[str, Any]:
    """The encoder's parameter tree (float32 numpy, in the layer layout of cfg.scan_layers) from a transformers
    BERT state dict (with or without the "bert." prefix); vocabulary rows past vocab_size are zeros. Shapes are
    checked first."""
    state_dict = {canonical_name(name): tensor for name, tensor in state_dict.items()}
    check_tensor_shapes({name: tuple(np.shape(t)) for name, t in state_dict.items()}, cfg, source, config_source)
    maps = tensor_map(cfg, encoder_prefix(state_dict))
    check_tied(state_dict, TIED_DECODER[0], maps[0].hf_key, source)
    return maps_to_params(maps, state_dict, cfg.scan_layers)


def params_to_hf(params: Mapping[str, Any], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """transformers' state dict (float32, vocabulary padding sliced off) of the BERT class
    `export_architecture(cfg)`, without the tied decoder copies transformers does not save either. `params` may
    be in either layer layout."""
    check_exportable(cfg)
    cfg = export_config(cfg)
    prefix = "" if export_architecture(cfg) == "BertModel" else "bert."
    return params_to_state_dict(tensor_map(cfg, prefix), params, "encoder")


# ----------------------------------------------------------------------------- tokenizer and convert


def _lowercase(src: str) -> bool:
    """tokenizer_config.json's do_lower_case (BertTokenizer's default True when absent)."""
    path = os.path.join(src, HF_TOKENIZER_CONFIG)
    return bool(read_json(path).get("do_lower_case", True)) if os.path.isfile(path) else True


def import_tokenizer(src: str, cfg: ModelConfig, kind: str | None = None, path: str = "") -> ImportedTokenizer:
    """The WordPiece tokenizer of the folder's vocab.txt (or `path`), whose line count must be the embedding's row
    count, and the masked-LM data settings of an imported BERT."""
    from llm_jax.data.tokenizers import WordPieceTokenizer, read_wordpiece_vocab

    if kind not in (None, "wordpiece"):
        raise ConversionError(f"--tokenizer={kind}: a BERT import reads a WordPiece vocab.txt (--tokenizer=wordpiece)")
    path = path or os.path.join(src, HF_VOCAB)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file; the import needs the model's WordPiece vocab.txt")
    with open(path, "rb") as f:
        vocab_bytes = f.read()
    tokens = read_wordpiece_vocab(vocab_bytes, path)
    if len(tokens) != cfg.vocab_size:
        raise ConversionError(f"{path}: vocab.txt has {len(tokens)} tokens but embeddings have {cfg.vocab_size} rows")
    lowercase = _lowercase(src)
    data = dict(tokenizer="wordpiece", tokenizer_path=os.path.abspath(path), lowercase=lowercase,
                objective="masked_lm", seq_len=min(IMPORT_SEQ_LEN, cfg.max_len),
                sentence_task="nsp" if "nsp" in cfg.heads else "none")
    return ImportedTokenizer(WordPieceTokenizer(vocab_bytes, path, lowercase=lowercase), data)


def write_tokenizer(tokenizer: Any, dst: str) -> None:
    """vocab.txt and tokenizer_config.json for WordPiece runs; other tokenizers have no BERT vocab file."""
    import json

    if getattr(tokenizer, "kind", None) != "wordpiece":
        logging.warning("vocab.txt not exported: the run's tokenizer is %r, which transformers' BertTokenizer "
                        "cannot read (it reads WordPiece vocab.txt files only); tokenize with llm_jax's "
                        "tokenizer in DIR/tokenizer", getattr(tokenizer, "kind", type(tokenizer).__name__))
        return
    with open(os.path.join(dst, HF_VOCAB), "wb") as f:
        f.write(tokenizer.file_bytes)
    tokenizer_config = {"tokenizer_class": "BertTokenizer", "do_lower_case": tokenizer.lowercase,
                        "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
                        "mask_token": "[MASK]"}
    with open(os.path.join(dst, HF_TOKENIZER_CONFIG), "w") as f:
        json.dump(tokenizer_config, f, indent=2)


def _exported_config(cfg: ModelConfig, special_ids: Mapping[str, int]) -> dict[str, Any]:
    """config.json of the export, with a warning for the heads (and pooler) the BERT class has no tensors for."""
    hf_config = hf_config_from_model(cfg, pad_token_id=special_ids.get("pad", 0))
    kept = export_config(cfg)
    skipped = sorted(set(cfg.heads) - set(kept.heads))
    if skipped or (cfg.pooler and not kept.pooler):
        logging.warning("not exported (no tensors in %s): heads %s%s", hf_config["architectures"][0], skipped,
                        ", the pooler" if cfg.pooler and not kept.pooler else "")
    return hf_config


ARCHITECTURE = Architecture(
    name="BERT", model_type="bert", classes=tuple(ARCHITECTURES), types=TYPES,
    model_config=model_config_from_hf,
    check_tensor_shapes=check_tensor_shapes, hf_to_params=hf_to_params, tokenizer=import_tokenizer,
    hf_config_from_model=_exported_config, params_to_hf=params_to_hf, write_tokenizer=write_tokenizer,
    canonical_name=canonical_name)
