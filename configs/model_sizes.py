"""Model-size presets: `apply_model_size(config, "gpt2_small")` sets the size keys of `config.model`."""

from __future__ import annotations

import ml_collections

from llm_jax.registry import Registry

MODEL_SIZES: Registry[dict] = Registry("model size")
MODEL_SIZES.add("nano", dict(num_layers=4, num_heads=4, d_model=128, d_ff=512))
MODEL_SIZES.add("micro", dict(num_layers=6, num_heads=6, d_model=384, d_ff=1536))
MODEL_SIZES.add("bert_mini", dict(num_layers=4, num_heads=4, d_model=256, d_ff=1024, max_len=512))
MODEL_SIZES.add("minilm_l6", dict(num_layers=6, num_heads=12, d_model=384, d_ff=1536, max_len=512))
MODEL_SIZES.add("bert_base", dict(num_layers=12, num_heads=12, d_model=768, d_ff=3072, max_len=512))
MODEL_SIZES.add("gpt2_small", dict(num_layers=12, num_heads=12, d_model=768, d_ff=3072, max_len=1024))
MODEL_SIZES.add("gpt2_medium", dict(num_layers=24, num_heads=16, d_model=1024, d_ff=4096, max_len=1024))
MODEL_SIZES.add("gpt2_large", dict(num_layers=36, num_heads=20, d_model=1280, d_ff=5120, max_len=1024))


def apply_model_size(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    config.model.update(**MODEL_SIZES.get(name))
    return config
