"""The README's first experiment: a small GPT on Python's own documentation, no data files.

The corpus is `pydoc_data.topics` (about 470 KB), which ships with every CPython, so this runs offline
anywhere. Each help topic is a document: prepared once as a TFDS dataset, a SentencePiece BPE tokenizer is
trained on the train topics, and the Grain pipeline shuffles, packs and batches them; the last 10% of
topics are held out for evaluation.

    python -m llm_jax.train --config=experiments/python_docs.py --workdir=runs/python_docs
    python -m llm_jax.generate --workdir=runs/python_docs --prompt="The with statement"

Variants: `:quick` (tests and smoke runs, seconds).
"""

from __future__ import annotations

import ml_collections

from configs.model_sizes import apply_model_size
from configs.presets import apply_presets, parse_variant
from llm_jax.config import default_config

VARIANTS = ("quick",)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant, presets = parse_variant(arg, "python_docs", VARIANTS)
    config = apply_model_size(default_config(), "nano")
    config.model.update(max_len=128, positional="rope", norm="rmsnorm",
                        activation="gelu", dropout=0.0, tie_embeddings=True)
    config.data.update(source="python_docs", pipeline="grain", tokenizer="sentencepiece",
                       sentencepiece_model_type="bpe", tokenizer_vocab_size=2048, seq_len=128)
    config.train.update(steps=1000, batch_size=16, log_every=100, eval_every=250, eval_steps=20,
                        checkpoint_every=500, steps_per_dispatch=10)
    config.optimizer.update(learning_rate=2e-3, warmup_steps=50, min_learning_rate=2e-4)
    if variant == "quick":
        apply_model_size(config, "pico")
        config.model.max_len = 32
        config.data.update(seq_len=32, tokenizer_vocab_size=512)
        config.train.update(steps=40, batch_size=8, log_every=10, eval_every=20, eval_steps=4,
                            checkpoint_every=20, steps_per_dispatch=5)
        config.optimizer.update(warmup_steps=5)
    return apply_presets(config, presets)
