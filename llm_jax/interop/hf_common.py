"""What every Hugging Face converter shares: the tensor table, reading a folder, checking config entries, and
the `Architecture` record an hf_* module registers (llm_jax.interop.architectures holds the registry).

A converter is one table, `tensor_map(cfg)`, that pairs every llm_jax parameter with its transformers tensor
and the layout change between them; import, export and the shape checks all read it, so they cannot disagree.
Everything here works on numpy arrays: no torch, no transformers.

Shape letters: D model width, N heads, K key/value heads, H head width, F MLP width, V vocabulary, P padded
vocabulary.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable, Iterable, Mapping

import numpy as np
from absl import logging

from llm_jax.models import layer_layout
from llm_jax.models.model_config import ModelConfig, padded_vocab

HF_CONFIG, HF_WEIGHTS, HF_INDEX = "config.json", "model.safetensors", "model.safetensors.index.json"
# config.json hidden_act / activation_function -> model.activation, and back
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu",
                  "silu": "silu", "swish": "silu"}
EXPORT_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu", "silu": "silu"}


class ConversionError(ValueError):
    """A checkpoint or model that cannot be converted; the message names the file, tensor or key."""


# ----------------------------------------------------------------------------- the tensor table


def _pad_rows(tensor: np.ndarray, rows: int) -> np.ndarray:
    return np.pad(tensor, [(0, rows - tensor.shape[0])] + [(0, 0)] * (tensor.ndim - 1))


# layout -> (transformers tensor -> parameter, parameter -> transformers tensor), given the TensorMap
LAYOUTS: dict[str, tuple[Callable[["TensorMap", np.ndarray], np.ndarray],
                         Callable[["TensorMap", np.ndarray], np.ndarray]]] = {
    # same values, maybe another shape (norm scales, biases split into heads, Conv1D [in, out] weights)
    "copy": (lambda m, t: t.reshape(m.param_shape), lambda m, p: p.reshape(m.hf_shape)),
    # torch Linear [out, in] -> kernel [*in, *out]
    "linear": (lambda m, t: t.T.reshape(m.param_shape), lambda m, p: p.reshape(m.hf_shape[::-1]).T),
    # vocabulary rows padded to the padded vocabulary (embeddings, MLM output bias)
    "vocab": (lambda m, t: _pad_rows(t, m.param_shape[0]), lambda m, p: p[:m.hf_shape[0]]),
    # an untied output projection: torch Linear [V, D] -> kernel [D, P]
    "vocab_linear": (lambda m, t: _pad_rows(t, m.param_shape[1]).T, lambda m, p: p[:, :m.hf_shape[0]].T),
}


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One parameter <-> one transformers tensor, with the `layout` (a LAYOUTS name) between them."""

    path: tuple[str, ...]
    hf_key: str
    hf_shape: tuple[int, ...]
    param_shape: tuple[int, ...]
    layout: str = "copy"

    def to_param(self, tensor: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(LAYOUTS[self.layout][0](self, np.asarray(tensor, np.float32)))

    def to_hf(self, param: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(LAYOUTS[self.layout][1](self, np.asarray(param, np.float32)))


def linear_maps(path: tuple[str, ...], hf_name: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...],
                bias: bool = True) -> list[TensorMap]:
    """A torch Linear ([out, in] weight, [out] bias) as a kernel [*in, *out] and bias [*out]."""
    hf_out, hf_in = math.prod(out_shape), math.prod(in_shape)
    maps = [TensorMap(path + ("kernel",), f"{hf_name}.weight", (hf_out, hf_in), in_shape + out_shape, "linear")]
    if bias:
        maps.append(TensorMap(path + ("bias",), f"{hf_name}.bias", (hf_out,), out_shape))
    return maps


def norm_maps(path: tuple[str, ...], hf_name: str, d_model: int, bias: bool = True) -> list[TensorMap]:
    """A LayerNorm (weight, bias) or RMSNorm (weight) as scale (and bias)."""
    maps = [TensorMap(path + ("scale",), f"{hf_name}.weight", (d_model,), (d_model,))]
    if bias:
        maps.append(TensorMap(path + ("bias",), f"{hf_name}.bias", (d_model,), (d_model,)))
    return maps


def listed(names: list[str], limit: int = 5) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_shapes(maps: list[TensorMap], shapes: Mapping[str, tuple[int, ...]], ignored: Callable[[str], bool],
                 what: str, source: str, config_source: str) -> None:
    """The tensors `shapes` (name -> shape) are exactly those of `maps`, apart from `ignored` ones; the error names
    `source`, the tensor, its shape and the one `config_source` implies, or the missing and unexpected tensors.
    `what` describes the model config.json gives (e.g. "2 layers, heads ['mlm']")."""
    expected = {m.hf_key: m.hf_shape for m in maps}
    missing = [key for key in expected if key not in shapes]
    if missing:
        raise ConversionError(f"{source}: missing tensors {listed(missing)} (needed by {config_source}: {what})")
    unexpected = sorted(key for key in shapes if key not in expected and not ignored(key))
    if unexpected:
        raise ConversionError(f"{source}: tensors {listed(unexpected)} are not part of the model that "
                              f"{config_source} describes ({what}); this converter would drop them")
    for key, shape in expected.items():
        if tuple(shapes[key]) != shape:
            raise ConversionError(f"{source}: tensor {key} has shape {tuple(shapes[key])} but {config_source} "
                                  f"implies {shape}")


def check_copy_shape(shapes: Mapping[str, tuple[int, ...]], key: str, cfg: ModelConfig, source: str,
                     config_source: str, of: str) -> None:
    """A saved copy of the embedding (`key`, e.g. a tied output projection) has the embedding's shape [V, D]."""
    shape = shapes.get(key)
    if shape is not None and tuple(shape) != (cfg.vocab_size, cfg.d_model):
        raise ConversionError(f"{source}: tensor {key} has shape {tuple(shape)} but {config_source} implies "
                              f"{(cfg.vocab_size, cfg.d_model)} (the {of} shape)")


def _set(tree: dict, path: tuple[str, ...], value: np.ndarray) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def _get(tree: Mapping, path: tuple[str, ...], family: str) -> Any:
    for depth, name in enumerate(path):
        if not isinstance(tree, Mapping) or name not in tree:
            raise ConversionError(f"the parameters have no {'/'.join(path[:depth + 1])}: not a {family}'s "
                                  "parameter tree (see the converter's tensor_map)")
        tree = tree[name]
    return tree


def maps_to_params(maps: list[TensorMap], state_dict: Mapping[str, np.ndarray], scan_layers: bool) -> dict:
    """The parameter tree (float32 numpy, in the layer layout of `scan_layers`) that `maps` fill from
    `state_dict`; check the shapes first."""
    params: dict[str, Any] = {}
    for m in maps:
        _set(params, m.path, m.to_param(state_dict[m.hf_key]))
    return layer_layout.to_layout(params, scan_layers)


def params_to_state_dict(maps: list[TensorMap], params: Mapping[str, Any], family: str) -> dict[str, np.ndarray]:
    """transformers' tensors (float32) of `maps` from `params` in either layer layout."""
    params = layer_layout.to_looped(params)
    return {m.hf_key: m.to_hf(np.asarray(_get(params, m.path, family))) for m in maps}


def check_tied(state_dict: Mapping[str, np.ndarray], copy_key: str, embedding_key: str, source: str) -> None:
    """A saved copy of the tied embedding (an output projection) must equal it: llm_jax ties them."""
    copy = state_dict.get(copy_key)
    if copy is not None and not np.array_equal(copy, state_dict[embedding_key]):
        raise ConversionError(f"{source}: {copy_key} differs from {embedding_key}: an untied output projection is "
                              "not supported for this architecture (llm_jax ties it to the token embedding)")


# ----------------------------------------------------------------------------- config.json entries


@dataclasses.dataclass(frozen=True)
class ConfigTypes:
    """The JSON types of the config.json entries a converter reads: positive ints (`sizes`; `counts` may be 0),
    numbers, strings; checked before any value is used."""

    sizes: tuple[str, ...] = ()
    counts: tuple[str, ...] = ()
    numbers: tuple[str, ...] = ()
    strings: tuple[str, ...] = ()

    def check(self, hf_config: Mapping[str, Any], path: str) -> None:
        def bad(key: str, what: str) -> ConversionError:
            return ConversionError(f"{path}: {key}={hf_config[key]!r} must be {what}")

        def is_int(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        for key in self.sizes:
            if hf_config.get(key) is not None and not (is_int(hf_config[key]) and hf_config[key] >= 1):
                raise bad(key, "a positive integer")
        for key in self.counts:
            if hf_config.get(key) is not None and not (is_int(hf_config[key]) and hf_config[key] >= 0):
                raise bad(key, "an integer >= 0")
        for key in self.numbers:
            if hf_config.get(key) is not None and not (isinstance(hf_config[key], (int, float))
                                                       and not isinstance(hf_config[key], bool)):
                raise bad(key, "a number")
        for key in ("model_type",) + self.strings:
            if key in hf_config and not isinstance(hf_config[key], str):
                raise bad(key, "a string")


def hf_value(hf_config: Mapping[str, Any], name: str, source: str, model: str) -> Any:
    """config.json's entry `name`; its absence is an error naming the file and the `model` it should describe."""
    if hf_config.get(name) is None:
        raise ConversionError(f"{source}: no {name!r} entry; is this a {model} config.json?")
    return hf_config[name]


def check_model_type(hf_config: Mapping[str, Any], model_type: str, classes: Iterable[str], source: str) -> None:
    found = hf_config.get("model_type")
    if found != model_type:
        raise ConversionError(f"{source}: model_type={found!r} is not supported by the {'/'.join(classes)} "
                              f"converter; only {model_type!r} converts")


def activation_from_hf(hf_config: Mapping[str, Any], key: str, source: str, model: str) -> str:
    """model.activation for config.json's activation entry `key`; an unsupported one lists the supported."""
    name = hf_value(hf_config, key, source, model)
    if name not in HF_ACTIVATIONS:
        raise ConversionError(f"{source}: {key}={name!r} is not supported; one of {', '.join(HF_ACTIVATIONS)}")
    return HF_ACTIVATIONS[name]


def check_required(cfg: ModelConfig, required: Mapping[str, Any], model: str) -> None:
    """`cfg` has every key of `required` at its value; the error names the model key that is not."""
    for name, value in required.items():
        if getattr(cfg, name) != value:
            raise ConversionError(f"model.{name}={getattr(cfg, name)!r}: {model} needs {name}={value!r}, so this "
                                  f"model cannot be exported to transformers' {model}")


def check_export_activation(cfg: ModelConfig, names: Mapping[str, str], key: str, model: str) -> None:
    """model.activation has a name (`names`) in the `model` config.json entry `key`."""
    if cfg.activation not in names:
        raise ConversionError(f"model.activation={cfg.activation!r} has no {model} {key}; one of {', '.join(names)}")


def check_full_width_heads(cfg: ModelConfig, model: str) -> None:
    """Multi-head attention whose heads split d_model (no grouped-query attention, no other head_dim)."""
    if cfg.num_kv_heads != cfg.num_heads or cfg.head_dim * cfg.num_heads != cfg.d_model:
        raise ConversionError(f"model.num_kv_heads={cfg.num_kv_heads}, head_dim={cfg.head_dim}: {model} needs "
                              f"num_kv_heads=num_heads={cfg.num_heads} and head_dim=d_model/num_heads")


def warn_ids_outside_vocab(hf_config: Mapping[str, Any], vocab_size: int, source: str) -> None:
    """Special-token ids past the vocabulary (a small GPT2Config keeps eos_token_id=50256) are unused by llm_jax
    (it reads special ids from its tokenizer): a warning, not an error."""
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = hf_config.get(key)
        values = value if isinstance(value, list) else [value]
        outside = [v for v in values if isinstance(v, int) and not 0 <= v < vocab_size]
        if outside:
            logging.warning("%s: %s=%r is outside the %d-id vocabulary; ignored (llm_jax takes special ids from "
                            "its tokenizer)", source, key, value, vocab_size)


def vocab_sizes(vocab_size: int, vocab_pad_multiple: int) -> dict[str, int]:
    """ModelConfig's vocabulary fields; no mesh yet, so the padded size is a vocab_pad_multiple multiple."""
    return dict(vocab_size=vocab_size, vocab_pad_multiple=vocab_pad_multiple,
                padded_vocab_size=padded_vocab(vocab_size, vocab_pad_multiple, {}))


# ----------------------------------------------------------------------------- reading a folder


def read_json(path: str) -> dict[str, Any]:
    """A JSON object file; a missing, unreadable or non-object file is a one-line error naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file; --src must be a Hugging Face model folder")
    try:
        with open(path, encoding="utf-8") as f:
            values = json.load(f)
    except json.JSONDecodeError as error:
        raise ConversionError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from error
    except UnicodeDecodeError as error:
        raise ConversionError(f"{path}: not valid JSON (invalid UTF-8 at byte {error.start})") from error
    if not isinstance(values, dict):
        raise ConversionError(f"{path}: holds a JSON {type(values).__name__}, not an object of settings")
    return values


def weight_files(src: str) -> list[str]:
    """model.safetensors, or the shards its index names."""
    single, index = os.path.join(src, HF_WEIGHTS), os.path.join(src, HF_INDEX)
    if os.path.isfile(single):
        return [single]
    if os.path.isfile(index):
        weight_map = read_json(index).get("weight_map", {})
        if not isinstance(weight_map, dict) or not all(isinstance(shard, str) for shard in weight_map.values()):
            raise ConversionError(f"{index}: 'weight_map' must map tensor names to shard file names")
        return [os.path.join(src, shard) for shard in sorted(set(weight_map.values()))]
    found = ", ".join(sorted(os.listdir(src))) if os.path.isdir(src) else "the folder does not exist"
    raise FileNotFoundError(f"{single}: no such file (found: {found}); only safetensors weights are read: "
                            "re-save a pytorch_model.bin with transformers' save_pretrained(safe_serialization=True)")


def tensor_shapes(files: list[str], canonical_name: Callable[[str], str]) -> dict[str, tuple[int, ...]]:
    """Canonical tensor name -> shape, read from the safetensors headers only."""
    from safetensors import SafetensorError, safe_open

    shapes = {}
    for path in files:
        try:
            with safe_open(path, framework="numpy") as f:
                for name in f.keys():
                    shapes[canonical_name(name)] = tuple(f.get_slice(name).get_shape())
        except (OSError, SafetensorError) as error:
            raise ConversionError(f"{path}: not a readable safetensors file ({error})") from error
    return shapes


def load_tensors(files: list[str]) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    tensors = {}
    for path in files:
        try:
            tensors.update(load_file(path))
        except (TypeError, ValueError, SafetensorError) as error:  # e.g. bfloat16, which numpy has no dtype for
            raise ConversionError(f"{path}: cannot be read into numpy ({error}); save it as float32 or float16") \
                from error
    return tensors


# ----------------------------------------------------------------------------- one architecture


@dataclasses.dataclass(frozen=True)
class ImportedTokenizer:
    """The tokenizer an import writes to DIR/tokenizer and the data.* settings of the run config it implies."""

    tokenizer: Any
    data: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Architecture:
    """What `python -m llm_jax.convert` needs of one Hugging Face model kind; an hf_* module builds one and
    llm_jax.interop.architectures registers it under its config.json `classes`.

    model_config(hf_config, vocab_pad_multiple, shapes, source) -> ModelConfig fields (checks config.json first);
    check_tensor_shapes(shapes, cfg, source, config_source); hf_to_params(state_dict, cfg, source, config_source);
    tokenizer(src, cfg, kind, path) -> ImportedTokenizer (before any weight is read); hf_config_from_model(cfg,
    special_ids) -> config.json; params_to_hf(params, cfg) -> tensors; write_tokenizer(tokenizer, dst)."""

    name: str
    model_type: str
    classes: tuple[str, ...]
    types: ConfigTypes
    model_config: Callable[..., dict[str, Any]]
    check_tensor_shapes: Callable[..., None]
    hf_to_params: Callable[..., dict[str, Any]]
    tokenizer: Callable[..., ImportedTokenizer]
    hf_config_from_model: Callable[..., dict[str, Any]]
    params_to_hf: Callable[..., dict[str, np.ndarray]]
    write_tokenizer: Callable[[Any, str], None] = lambda tokenizer, dst: None
    canonical_name: Callable[[str], str] = lambda name: name
