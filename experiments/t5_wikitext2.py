"""T5-style span-corruption pretraining on WikiText-2 (an encoder-decoder, data.objective=span_corruption).

Trains on the WikiText-2 validation file and evaluates on the test file (../shared/data), paragraphs as
documents, with a SentencePiece BPE tokenizer trained here plus 100 sentinel ids above it (<extra_id_0> is the
top id); 15% of each chunk's tokens are hidden in spans of mean length 3, chunks sized so the encoder gets
data.seq_len tokens (the decoder gets what the targets need):

    python -m llm_jax.train --config=experiments/t5_wikitext2.py --workdir=runs/t5_wikitext2
    python -m llm_jax.generate --workdir=runs/t5_wikitext2 --temperature=0 \\
        --prompt="The game was released in"

experiments/t5_sst2.py fine-tunes the result. Variants: `:quick` (tests), `:transformer` (the original
Transformer's architecture instead of T5's, same objective).
"""

from __future__ import annotations

import os

import ml_collections

from configs.encoder_decoder import apply_encoder_decoder
from configs.presets import apply_presets, parse_variant
from llm_jax.config import default_config

VARIANTS = ("quick", "transformer")
DATA_DIR = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data"))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant, presets = parse_variant(arg, "t5_wikitext2", VARIANTS)
    config = apply_encoder_decoder(default_config(), "transformer" if variant == "transformer" else "t5", "nano")
    config.model.update(max_len=128, dropout=0.1)
    config.data.update(pipeline="grain", source="text_file", split_by="blank_line", objective="span_corruption",
                       path=os.path.join(DATA_DIR, "wikitext2_valid.txt"),
                       eval_path=os.path.join(DATA_DIR, "wikitext2_test.txt"), eval_split="test",
                       tokenizer="sentencepiece", sentencepiece_model_type="bpe", tokenizer_vocab_size=8192,
                       seq_len=128, packing_bins=16)
    config.train.update(steps=1000, batch_size=16, log_every=50, eval_every=250, eval_steps=20,
                        checkpoint_every=500, steps_per_dispatch=10)
    config.optimizer.update(learning_rate=2e-3, warmup_steps=100, min_learning_rate=1e-4, weight_decay=0.01)
    if variant == "quick":
        config.model.update(num_layers=2, num_heads=2, d_model=32, max_len=64, dropout=0.0)
        config.data.update(tokenizer_vocab_size=512, seq_len=64)
        config.train.update(steps=10, batch_size=4, log_every=5, eval_every=0, eval_steps=2, checkpoint_every=0,
                            steps_per_dispatch=5)
        config.optimizer.update(warmup_steps=2)
    return apply_presets(config, presets)
