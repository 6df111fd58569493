"""Model families, selected by `model.family`: each builds a Flax module from the frozen ModelConfig and
says which self-attention it uses (tasks check that a family can run them)."""

from __future__ import annotations

from typing import Callable

import flax.linen as nn

from llm_jax.models.decoder import DecoderLM
from llm_jax.models.encoder import Encoder
from llm_jax.models.encoder_decoder import EncoderDecoder
from llm_jax.models.model_config import ModelConfig
from llm_jax.registry import Registry

FAMILIES: Registry[Callable[[ModelConfig], nn.Module]] = Registry("model family")
FAMILIES.add("decoder", DecoderLM)
FAMILIES.add("encoder", Encoder)
FAMILIES.add("encoder_decoder", EncoderDecoder)


def build_model(config: ModelConfig) -> nn.Module:
    return FAMILIES.get(config.family)(config)
