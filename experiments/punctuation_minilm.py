"""Sequence labelling: punctuation restoration on WikiText-2 with the all-MiniLM-L6-v2 encoder and a
linear-chain CRF output layer.

Every word is tagged with the punctuation mark that followed it (O, COMMA, PERIOD, QUESTION) and the marks
are removed (`llm_jax.data.punctuation`; no labelled corpus installs from the package registries, see the
README). Trains on wikitext2_valid.txt, evaluates on wikitext2_test.txt (../shared/data):

    python -m llm_jax.convert --from=hf --src=$(python -c "from configs.encoders import minilm_dir; print(minilm_dir())") --workdir=runs/minilm
    python -m llm_jax.train --config=experiments/punctuation_minilm.py --workdir=runs/punct_crf
    python -m llm_jax.train --config=experiments/punctuation_minilm.py:softmax --workdir=runs/punct_softmax

Variants: `:softmax` (per-token softmax instead of the CRF), `:quick` and `:quick_softmax` (tests).
"""

from __future__ import annotations

import os

import ml_collections

from configs.encoders import apply_bert, minilm_vocab
from configs.presets import apply_presets, parse_variant
from llm_jax.config import default_config
from llm_jax.data.punctuation import PUNCTUATION_LABELS

VARIANTS = ("softmax", "quick", "quick_softmax")
DATA_DIR = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data"))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant, presets = parse_variant(arg, "punctuation_minilm", VARIANTS)
    config = apply_bert(default_config(), "minilm_l6")
    config.model.update(dropout=0.1, crf="softmax" not in (variant or ""))
    config.data.update(pipeline="grain", source="punctuation", objective="token_classification",
                       labels=PUNCTUATION_LABELS, path=os.path.join(DATA_DIR, "wikitext2_valid.txt"),
                       eval_path=os.path.join(DATA_DIR, "wikitext2_test.txt"), eval_split="test",
                       tokenizer="wordpiece", tokenizer_path=minilm_vocab(), lowercase=True, seq_len=96)
    config.train.update(init_from="runs/minilm", steps=400, batch_size=16, log_every=50, eval_every=200,
                        eval_steps=-1, checkpoint_every=200, steps_per_dispatch=10)
    config.optimizer.update(learning_rate=1e-4, warmup_steps=40, min_learning_rate=0.0, weight_decay=0.01,
                            schedule="linear", b2=0.999)
    if config.model.crf:  # the transition scores start at zero beside a pretrained encoder: let them move
        config.optimizer.lr_multipliers = (("crf/.*", 100.0),)
    if variant and variant.startswith("quick"):
        config.data.seq_len = 32
        config.train.update(steps=4, batch_size=8, log_every=2, eval_every=0, eval_steps=2, checkpoint_every=0,
                            steps_per_dispatch=2)
        config.optimizer.update(warmup_steps=1)
    return apply_presets(config, presets)
