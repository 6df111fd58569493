"""nanoGPT's CPU recipe: a 4-layer character-level GPT on Tiny Shakespeare (val loss ~1.88 at 2000 steps).

    python -m llm_jax.train --config=experiments/shakespeare_char.py --workdir=runs/shakespeare_char
    python -m llm_jax.train --config=experiments/shakespeare_char.py:quick --workdir=/tmp/quick

The default variant is the measured recipe; `quick` is a few-second smoke run; `grain` feeds the same model
from the Grain pipeline instead (speeches as documents, shuffled per epoch, packed with segment ids).
"""

from __future__ import annotations

import os

import ml_collections

from configs.model_sizes import apply_model_size
from configs.presets import apply_presets, parse_variant
from llm_jax.config import default_config

VARIANTS = ("quick", "grain")
DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "tinyshakespeare.txt")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant, presets = parse_variant(arg, "shakespeare_char", VARIANTS)
    config = apply_model_size(default_config(), "nano")
    config.model.update(max_len=64, positional="learned",
                        norm="layernorm", activation="gelu", use_bias=False, dropout=0.0, tie_embeddings=True)
    # nanoGPT samples random windows of the whole token stream (90/10 split), not packed documents
    config.data.update(pipeline="windows", source="text_file", path=os.path.normpath(DATA), split_by="file",
                       tokenizer="char", seq_len=64)
    config.train.update(steps=2000, batch_size=12, log_every=100, eval_every=500, eval_steps=20,
                        checkpoint_every=1000, steps_per_dispatch=20)
    config.optimizer.update(learning_rate=1e-3, schedule="cosine", warmup_steps=100, min_learning_rate=1e-4,
                            weight_decay=0.1, b1=0.9, b2=0.99, grad_clip_norm=1.0)
    config.mesh.cpu_devices = -1  # on a CPU, one XLA device per core, each training its shard of the batch
    if variant == "quick":
        apply_model_size(config, "tiny")
        config.train.update(steps=60, log_every=20, eval_every=30, eval_steps=4, checkpoint_every=30,
                            steps_per_dispatch=10)
        config.optimizer.update(warmup_steps=10)
        config.mesh.cpu_devices = 0  # the smoke run keeps one device (the suite's programs stay as they were)
    elif variant == "grain":
        config.data.update(pipeline="grain", split_by="blank_line")
    return apply_presets(config, presets)


def get_sweep() -> list[dict]:
    """Learning rate x width, for launch.sweep."""
    return [{"optimizer.learning_rate": lr, "model.d_model": width}
            for lr in (3e-4, 1e-3, 3e-3) for width in (64, 128)]
