"""The frozen model config: what the model code reads, built once from the experiment config."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp
import ml_collections


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Resolved model hyper-parameters (no None left); variants come from `.replace(...)`."""

    family: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    d_model: int
    d_ff: int
    head_dim: int
    vocab_size: int
    padded_vocab_size: int
    max_len: int
    positional: str
    rope_base: float
    norm: str
    norm_eps: float
    activation: str
    mlp: str
    use_bias: bool
    dropout: float
    tie_embeddings: bool
    init_std: float
    dtype: Any
    param_dtype: Any

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @property
    def residual_init_std(self) -> float:
        """Init stddev of projections that write into the residual stream (GPT-2 scaling)."""
        return self.init_std / math.sqrt(2 * self.num_layers)


def padded_vocab(vocab_size: int, pad_multiple: int, mesh_sizes: dict[str, int]) -> int:
    """Smallest size >= vocab_size divisible by pad_multiple and by every mesh axis."""
    multiple = math.lcm(pad_multiple, *mesh_sizes.values())
    return -(-vocab_size // multiple) * multiple


def build_model_config(model: ml_collections.ConfigDict, vocab_size: int,
                       mesh_sizes: dict[str, int]) -> ModelConfig:
    """Freezes `config.model`, filling the None defaults; `vocab_size` is the tokenizer's unless set."""
    vocab = model.vocab_size or vocab_size
    return ModelConfig(
        family=model.family,
        num_layers=model.num_layers,
        num_heads=model.num_heads,
        num_kv_heads=model.num_kv_heads or model.num_heads,
        d_model=model.d_model,
        d_ff=model.d_ff or 4 * model.d_model,
        head_dim=model.head_dim or model.d_model // model.num_heads,
        vocab_size=vocab,
        padded_vocab_size=padded_vocab(vocab, model.vocab_pad_multiple, mesh_sizes),
        max_len=model.max_len,
        positional=model.positional,
        rope_base=model.rope_base,
        norm=model.norm,
        norm_eps=model.norm_eps,
        activation=model.activation,
        mlp=model.mlp,
        use_bias=model.use_bias,
        dropout=model.dropout,
        tie_embeddings=model.tie_embeddings,
        init_std=model.init_std,
        dtype=jnp.dtype(model.dtype),
        param_dtype=jnp.dtype(model.param_dtype),
    )


def model_config_to_json(cfg: ModelConfig) -> dict[str, Any]:
    values = dataclasses.asdict(cfg)
    values["dtype"], values["param_dtype"] = cfg.dtype.name, cfg.param_dtype.name
    return values


def model_config_from_json(values: dict[str, Any]) -> ModelConfig:
    values = dict(values, dtype=jnp.dtype(values["dtype"]), param_dtype=jnp.dtype(values["param_dtype"]))
    return ModelConfig(**values)
