"""A small BERT pretrained from scratch on WikiText-2: masked LM + next-sentence prediction, SentencePiece.

Trains on the WikiText-2 validation file (paragraphs as documents, sentence pairs cut from them) and
evaluates MLM and NSP on the test file (both in ../shared/data):

    python -m llm_jax.train --config=experiments/bert_wikitext2.py --workdir=runs/bert_wikitext2

Variants: `:sop` (sentence-order prediction instead of NSP), `:wwm` (whole-word masking), `:quick` (tests).
"""

from __future__ import annotations

import os

import ml_collections

from configs.encoders import apply_bert
from configs.presets import apply_presets, apply_smoke_run, parse_variant
from llm_jax.config import default_config

VARIANTS = ("quick", "sop", "wwm")
DATA_DIR = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data"))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant, presets = parse_variant(arg, "bert_wikitext2", VARIANTS)
    config = apply_bert(default_config(), "mini")
    config.model.update(max_len=128, dropout=0.1)
    config.data.update(pipeline="grain", source="text_file", split_by="blank_line", objective="masked_lm",
                       path=os.path.join(DATA_DIR, "wikitext2_valid.txt"),
                       eval_path=os.path.join(DATA_DIR, "wikitext2_test.txt"), eval_split="test",
                       tokenizer="sentencepiece", sentencepiece_model_type="bpe", tokenizer_vocab_size=8192,
                       seq_len=128, sentence_task="nsp", mlm_probability=0.15)
    config.train.update(steps=600, batch_size=32, log_every=50, eval_every=100, eval_steps=20,
                        checkpoint_every=300, steps_per_dispatch=10)
    config.optimizer.update(learning_rate=1e-3, warmup_steps=60, min_learning_rate=1e-5, weight_decay=0.01,
                            b2=0.98, eps=1e-6)
    if variant == "sop":
        config.data.sentence_task = "sop"
    elif variant == "wwm":
        config.data.whole_word_masking = True
    elif variant == "quick":
        apply_smoke_run(config)
    return apply_presets(config, presets)
