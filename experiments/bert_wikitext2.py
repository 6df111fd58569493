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
from llm_jax.config import default_config

VARIANTS = ("quick", "sop", "wwm")
DATA_DIR = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data"))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = apply_bert(default_config(), "bert_mini")
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
    if arg == "sop":
        config.data.sentence_task = "sop"
    elif arg == "wwm":
        config.data.whole_word_masking = True
    elif arg == "quick":
        config.model.update(num_layers=2, d_model=64, num_heads=2, d_ff=128, max_len=32, dropout=0.0)
        config.data.update(seq_len=32, tokenizer_vocab_size=1024)
        config.train.update(steps=20, batch_size=8, log_every=10, eval_every=0, eval_steps=4, checkpoint_every=0,
                            steps_per_dispatch=10)
        config.optimizer.update(warmup_steps=5)
    elif arg:
        raise ValueError(f"unknown variant {arg!r} of bert_wikitext2; use no argument or one of {VARIANTS}")
    return config
