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

import dataclasses
import math
from typing import Any, Iterable, Mapping

import numpy as np

from llm_jax.models import layer_layout
from llm_jax.models.model_config import ModelConfig, padded_vocab

FAMILY = "encoder"
# architectures -> (heads, pooler) they carry; what a checkpoint holds is read from its tensors
ARCHITECTURES = {"BertModel": ((), True), "BertForPreTraining": (("mlm", "nsp"), True),
                 "BertForMaskedLM": (("mlm",), False)}
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu",
                  "silu": "silu", "swish": "silu"}
EXPORT_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu", "silu": "silu"}
EXPORTED_HEADS = ("mlm", "nsp")
TIED_DECODER = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")  # copies of other tensors


class ConversionError(ValueError):
    """A checkpoint or model that cannot be converted; the message names the file, tensor or key."""


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One parameter <-> one transformers tensor. `layout`: copy; linear (kernel = W.T, reshaped);
    reshape (bias split into heads); vocab (rows padded to the padded vocabulary)."""

    path: tuple[str, ...]
    hf_key: str
    hf_shape: tuple[int, ...]
    param_shape: tuple[int, ...]
    layout: str = "copy"

    def to_param(self, tensor: np.ndarray) -> np.ndarray:
        tensor = np.asarray(tensor, np.float32)
        if self.layout == "linear":
            return tensor.T.reshape(self.param_shape)
        if self.layout == "vocab":
            padding = [(0, self.param_shape[0] - self.hf_shape[0])] + [(0, 0)] * (tensor.ndim - 1)
            return np.pad(tensor, padding)
        return tensor.reshape(self.param_shape)

    def to_hf(self, param: np.ndarray) -> np.ndarray:
        param = np.asarray(param, np.float32)
        if self.layout == "linear":
            return np.ascontiguousarray(param.reshape(self.hf_shape[::-1]).T)
        if self.layout == "vocab":
            return np.ascontiguousarray(param[:self.hf_shape[0]])
        return param.reshape(self.hf_shape)


def _dense(path: tuple[str, ...], hf_name: str, in_shape: tuple[int, ...],
           out_shape: tuple[int, ...]) -> list[TensorMap]:
    """A torch Linear ([out, in] weight, [out] bias) as a kernel [*in, *out] and bias [*out]."""
    hf_out, hf_in = math.prod(out_shape), math.prod(in_shape)
    return [TensorMap(path + ("kernel",), f"{hf_name}.weight", (hf_out, hf_in), in_shape + out_shape, "linear"),
            TensorMap(path + ("bias",), f"{hf_name}.bias", (hf_out,), out_shape, "reshape")]


def _norm(path: tuple[str, ...], hf_name: str, d_model: int) -> list[TensorMap]:
    return [TensorMap(path + ("scale",), f"{hf_name}.weight", (d_model,), (d_model,)),
            TensorMap(path + ("bias",), f"{hf_name}.bias", (d_model,), (d_model,))]


def _block_map(cfg: ModelConfig, layer: int, prefix: str) -> list[TensorMap]:
    D, N, H, F = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.d_ff
    ours, hf = (f"block_{layer}",), f"{prefix}encoder.layer.{layer}."
    maps = []
    for name in ("query", "key", "value"):
        maps += _dense(ours + ("attention", name), f"{hf}attention.self.{name}", (D,), (N, H))
    maps += _dense(ours + ("attention", "out"), f"{hf}attention.output.dense", (N, H), (D,))
    maps += _norm(ours + ("attention_norm",), f"{hf}attention.output.LayerNorm", D)
    maps += _dense(ours + ("mlp", "up"), f"{hf}intermediate.dense", (D,), (F,))
    maps += _dense(ours + ("mlp", "down"), f"{hf}output.dense", (F,), (D,))
    maps += _norm(ours + ("mlp_norm",), f"{hf}output.LayerNorm", D)
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
    maps += _norm(("embedding_norm",), f"{emb}LayerNorm", D)
    for layer in range(cfg.num_layers):
        maps += _block_map(cfg, layer, prefix)
    if cfg.pooler:
        maps += _dense(("pooler",), f"{prefix}pooler.dense", (D,), (D,))
    if "mlm" in cfg.heads:
        maps += _dense(("mlm_head", "transform"), "cls.predictions.transform.dense", (D,), (D,))
        maps += _norm(("mlm_head", "transform_norm"), "cls.predictions.transform.LayerNorm", D)
        maps.append(TensorMap(("mlm_head", "output_bias"), "cls.predictions.bias", (V,), (P,), "vocab"))
    if "nsp" in cfg.heads:
        maps += _dense(("nsp_head",), "cls.seq_relationship", (D,), (2,))
    return maps


# ----------------------------------------------------------------------------- configs


def _hf_value(hf_config: Mapping[str, Any], name: str, source: str) -> Any:
    if name not in hf_config:
        raise ConversionError(f"{source}: no {name!r} entry; is this a BERT config.json?")
    return hf_config[name]


def check_hf_config(hf_config: Mapping[str, Any], source: str = "config.json") -> None:
    """A BERT config this converter maps exactly; one-line errors naming `source` and the entry."""
    model_type = hf_config.get("model_type")
    if model_type != "bert":
        raise ConversionError(f"{source}: model_type={model_type!r} is not supported; only 'bert' converts "
                              "(BertModel, BertForPreTraining, BertForMaskedLM)")
    unsupported = [name for name in hf_config.get("architectures") or () if name not in ARCHITECTURES]
    if unsupported:
        raise ConversionError(f"{source}: architectures {unsupported} are not supported; only "
                              f"{', '.join(ARCHITECTURES)} convert")
    activation = _hf_value(hf_config, "hidden_act", source)
    if activation not in HF_ACTIVATIONS:
        raise ConversionError(f"{source}: hidden_act={activation!r} is not supported; one of "
                              f"{', '.join(HF_ACTIVATIONS)}")
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
        family=FAMILY, num_layers=_hf_value(hf_config, "num_hidden_layers", source), num_heads=num_heads,
        num_kv_heads=num_heads, d_model=width, d_ff=_hf_value(hf_config, "intermediate_size", source),
        head_dim=width // num_heads, vocab_size=vocab, vocab_pad_multiple=vocab_pad_multiple,
        padded_vocab_size=padded_vocab(vocab, vocab_pad_multiple, {}),  # no mesh yet: a vocab_pad_multiple multiple
        max_len=_hf_value(hf_config, "max_position_embeddings", source), positional="learned",
        norm="layernorm", norm_position="post", norm_eps=float(hf_config.get("layer_norm_eps", 1e-12)),
        activation=HF_ACTIVATIONS[hf_config["hidden_act"]], mlp="standard", use_bias=True,
        dropout=float(hf_config.get("hidden_dropout_prob", 0.1)), tie_embeddings=True,
        type_vocab_size=int(hf_config.get("type_vocab_size", 2)), embedding_norm=True, pooler=pooler,
        init_std=float(hf_config.get("initializer_range", 0.02)), heads=heads)


def check_exportable(cfg: ModelConfig) -> None:
    """`cfg` is a model transformers' BERT computes exactly; the error names the model key that is not."""
    required = {"family": FAMILY, "positional": "learned", "norm": "layernorm", "norm_position": "post",
                "mlp": "standard", "use_bias": True, "embedding_norm": True, "tie_embeddings": True}
    for name, value in required.items():
        if getattr(cfg, name) != value:
            raise ConversionError(f"model.{name}={getattr(cfg, name)!r}: BERT needs {name}={value!r}, "
                                  "so this model cannot be exported to transformers' BertModel")
    if cfg.activation not in EXPORT_ACTIVATIONS:
        raise ConversionError(f"model.activation={cfg.activation!r} has no BERT hidden_act; one of "
                              f"{', '.join(EXPORT_ACTIVATIONS)}")
    if cfg.num_kv_heads != cfg.num_heads or cfg.head_dim * cfg.num_heads != cfg.d_model:
        raise ConversionError(f"model.num_kv_heads={cfg.num_kv_heads}, head_dim={cfg.head_dim}: BERT needs "
                              f"num_kv_heads=num_heads={cfg.num_heads} and head_dim=d_model/num_heads")
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


def _listed(names: list[str], limit: int = 5) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_tensor_shapes(shapes: Mapping[str, tuple[int, ...]], cfg: ModelConfig, source: str = "model.safetensors",
                        config_source: str = "config.json") -> None:
    """The tensors `shapes` (canonical name -> shape) are exactly those of `cfg`; the error names `source`,
    the tensor, its shape and the one `config_source` implies, or the missing and unexpected tensors."""
    maps = tensor_map(cfg, encoder_prefix(shapes))
    expected = {m.hf_key: m.hf_shape for m in maps}
    missing = [key for key in expected if key not in shapes]
    if missing:
        raise ConversionError(f"{source}: missing tensors {_listed(missing)} (needed by {config_source}: "
                              f"{cfg.num_layers} layers, heads {list(cfg.heads)})")
    unexpected = sorted(key for key in shapes if key not in expected and not _ignored(key))
    if unexpected:
        raise ConversionError(f"{source}: tensors {_listed(unexpected)} are not part of the BERT that "
                              f"{config_source} describes ({cfg.num_layers} layers); this converter would drop them")
    for key, shape in expected.items():
        if tuple(shapes[key]) != shape:
            raise ConversionError(f"{source}: tensor {key} has shape {tuple(shapes[key])} but {config_source} "
                                  f"implies {shape}")
    prefix = encoder_prefix(shapes)
    decoder = shapes.get(TIED_DECODER[0])
    if decoder is not None and tuple(decoder) != (cfg.vocab_size, cfg.d_model):
        raise ConversionError(f"{source}: tensor {TIED_DECODER[0]} has shape {tuple(decoder)} but {config_source} "
                              f"implies {(cfg.vocab_size, cfg.d_model)} (the {prefix}embeddings' shape)")


def _set(tree: dict, path: tuple[str, ...], value: np.ndarray) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def _get(tree: Mapping, path: tuple[str, ...]) -> Any:
    for depth, name in enumerate(path):
        if not isinstance(tree, Mapping) or name not in tree:
            raise ConversionError(f"the parameters have no {'/'.join(path[:depth + 1])}: not an encoder's "
                                  "parameter tree (see llm_jax.interop.hf_bert.tensor_map)")
        tree = tree[name]
    return tree


def _check_tied_decoder(state_dict: Mapping[str, np.ndarray], embedding_key: str, source: str) -> None:
    decoder = state_dict.get(TIED_DECODER[0])
    if decoder is not None and not np.array_equal(decoder, state_dict[embedding_key]):
        raise ConversionError(f"{source}: {TIED_DECODER[0]} differs from {embedding_key}: an untied MLM decoder "
                              "is not supported (the encoder ties it to the token embedding)")


def hf_to_params(state_dict: Mapping[str, np.ndarray], cfg: ModelConfig, source: str = "model.safetensors",
                 config_source: str = "config.json") -> dict[str, Any]:
    """The encoder's parameter tree (float32 numpy, in the layer layout of cfg.scan_layers) from a transformers
    BERT state dict (with or without the "bert." prefix); vocabulary rows past vocab_size are zeros. Shapes are
    checked first."""
    state_dict = {canonical_name(name): tensor for name, tensor in state_dict.items()}
    check_tensor_shapes({name: tuple(np.shape(t)) for name, t in state_dict.items()}, cfg, source, config_source)
    maps = tensor_map(cfg, encoder_prefix(state_dict))
    _check_tied_decoder(state_dict, maps[0].hf_key, source)
    params: dict[str, Any] = {}
    for m in maps:
        _set(params, m.path, m.to_param(state_dict[m.hf_key]))
    return layer_layout.to_layout(params, cfg.scan_layers)


def params_to_hf(params: Mapping[str, Any], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """transformers' state dict (float32, vocabulary padding sliced off) of the BERT class
    `export_architecture(cfg)`, without the tied decoder copies transformers does not save either. `params` may
    be in either layer layout."""
    check_exportable(cfg)
    cfg = export_config(cfg)
    params = layer_layout.to_looped(params)
    prefix = "" if export_architecture(cfg) == "BertModel" else "bert."
    return {m.hf_key: m.to_hf(np.asarray(_get(params, m.path))) for m in tensor_map(cfg, prefix)}
