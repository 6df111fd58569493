"""The registry of Hugging Face architectures `python -m llm_jax.convert` reads and writes.

Import picks the converter by config.json's `architectures` (its `model_type` when the list is absent); export
picks it by the run's model.family and model.positional. A new architecture is one hf_* module that builds an
`Architecture` plus its lines here.
"""

from __future__ import annotations

from typing import Any, Mapping

from llm_jax.interop import hf_bert, hf_gpt2, hf_llama, hf_t5
from llm_jax.interop.hf_common import Architecture, ConversionError
from llm_jax.models.model_config import ModelConfig
from llm_jax.registry import Registry

CONVERTERS = (hf_bert.ARCHITECTURE, hf_gpt2.ARCHITECTURE, hf_llama.ARCHITECTURE, hf_t5.ARCHITECTURE)
ARCHITECTURES: Registry[Architecture] = Registry("Hugging Face architecture")
for _converter in CONVERTERS:
    for _name in _converter.classes:
        ARCHITECTURES.add(_name, _converter)
# config.json without an architectures list: its model_type -> the class it is read as
MODEL_TYPES = {converter.model_type: converter.classes[0] for converter in CONVERTERS}
# (model.family, model.positional or None for any) -> the converter an export uses
EXPORTS: dict[tuple[str, str | None], Architecture] = {
    ("encoder", None): hf_bert.ARCHITECTURE, ("decoder", "learned"): hf_gpt2.ARCHITECTURE,
    ("decoder", "rope"): hf_llama.ARCHITECTURE, ("encoder_decoder", "t5_relative_bias"): hf_t5.ARCHITECTURE}


def supported() -> str:
    return ", ".join(ARCHITECTURES.names())


def for_hf_config(hf_config: Mapping[str, Any], source: str) -> Architecture:
    """The converter of config.json's first architecture; an unsupported one is an error naming it and listing the
    supported ones (before any weight is read)."""
    architectures = hf_config.get("architectures")
    if architectures is not None and not (isinstance(architectures, list)
                                          and all(isinstance(name, str) for name in architectures)):
        raise ConversionError(f"{source}: architectures={architectures!r} must be a list of class names")
    if not architectures:
        model_type = hf_config.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ConversionError(f"{source}: no architectures entry and model_type={model_type!r} is not supported; "
                                  f"supported architectures: {supported()}")
        architectures = [MODEL_TYPES[model_type]]
    unknown = [name for name in architectures if name not in ARCHITECTURES]
    if unknown:
        raise ConversionError(f"{source}: architectures {unknown} are not supported; supported: {supported()}")
    return ARCHITECTURES.get(architectures[0])


def for_model(cfg: ModelConfig) -> Architecture:
    """The converter that exports `cfg`, by model.family and model.positional; the error names the key."""
    converter = EXPORTS.get((cfg.family, cfg.positional)) or EXPORTS.get((cfg.family, None))
    if converter is None:
        choices = ", ".join(f"family={family!r}" + (f" with positional={positional!r}" if positional else "")
                            for family, positional in EXPORTS)
        raise ConversionError(f"model.family={cfg.family!r}, model.positional={cfg.positional!r}: no Hugging Face "
                              f"architecture computes this model; exportable: {choices}")
    return converter
