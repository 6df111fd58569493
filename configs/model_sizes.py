"""Model-size presets, the one place a size is defined: experiments, benchmarks and tests take theirs from here.

`apply_model_size(config, "nano")` sets the size keys of `config.model`; on the command line an experiment
takes one as a variant option, `--config=experiments/X.py:size=nano` (see `configs/presets.py`). `d_ff` is
4 * d_model unless a size says otherwise; sizes of published weights also fix `max_len`.
"""

from __future__ import annotations

import ml_collections

from llm_jax.registry import Registry

MODEL_SIZES: Registry[dict] = Registry("model size")
# the unit tests' model: 4 heads, so tensor=4 and grouped-query attention fit
MODEL_SIZES.add("test", dict(num_layers=2, num_heads=4, d_model=32, d_ff=None))
# research sizes: smoke runs (pico, tiny), the CPU recipes (nano: shakespeare, python_docs; mini: wikitext2, BERT)
MODEL_SIZES.add("pico", dict(num_layers=2, num_heads=2, d_model=32, d_ff=None))
MODEL_SIZES.add("tiny", dict(num_layers=2, num_heads=2, d_model=64, d_ff=None))
MODEL_SIZES.add("nano", dict(num_layers=4, num_heads=4, d_model=128, d_ff=None))
MODEL_SIZES.add("mini", dict(num_layers=4, num_heads=4, d_model=256, d_ff=None))
MODEL_SIZES.add("micro", dict(num_layers=6, num_heads=6, d_model=384, d_ff=None))
# published architectures
MODEL_SIZES.add("minilm_l6", dict(num_layers=6, num_heads=12, d_model=384, d_ff=1536, max_len=512))
MODEL_SIZES.add("bert_base", dict(num_layers=12, num_heads=12, d_model=768, d_ff=3072, max_len=512))
MODEL_SIZES.add("gpt2_small", dict(num_layers=12, num_heads=12, d_model=768, d_ff=3072, max_len=1024))
MODEL_SIZES.add("gpt2_medium", dict(num_layers=24, num_heads=16, d_model=1024, d_ff=4096, max_len=1024))
MODEL_SIZES.add("gpt2_large", dict(num_layers=36, num_heads=20, d_model=1280, d_ff=5120, max_len=1024))


def apply_model_size(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """`config` with the size keys of preset `name` (an unknown name lists the known ones)."""
    config.model.update(**MODEL_SIZES.get(name))
    return config
