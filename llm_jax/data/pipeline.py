"""The data interface the trainer consumes: a tokenizer, a resumable training stream, evaluation batches.

`build_data` turns `config.data` into an `LMData`; other pipelines (TFDS + SentencePiece + Grain) plug in
by returning an object with the same three members.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Iterator

import jax
import ml_collections

from llm_jax.config import ConfigError
from llm_jax.data import lm_batches
from llm_jax.data.sources import SOURCES
from llm_jax.data.tokenizers import TOKENIZER_FILE, TOKENIZERS, Tokenizer, load_tokenizer

SPLITS = ("train", "validation")


@dataclasses.dataclass
class LMData:
    tokenizer: Tokenizer
    train: lm_batches.RandomWindowStream
    eval_batches: Callable[[str, int], Iterator[lm_batches.Batch]]


def _tokenizer_for(config: ml_collections.ConfigDict, text: str, tokenizer_dir: str | None) -> Tokenizer:
    """The run's tokenizer: loaded from DIR/tokenizer when the run already has one, else fitted (the same
    on every process) and saved by process 0."""
    if tokenizer_dir and os.path.exists(os.path.join(tokenizer_dir, TOKENIZER_FILE)):
        tokenizer = load_tokenizer(tokenizer_dir)
        if tokenizer.kind != config.data.tokenizer:
            raise ConfigError(f"data.tokenizer={config.data.tokenizer!r} but {tokenizer_dir} holds a "
                              f"{tokenizer.kind!r} tokenizer; use a fresh --workdir")
        return tokenizer
    tokenizer = TOKENIZERS.get(config.data.tokenizer).fit(text, config.data)
    if tokenizer_dir and jax.process_index() == 0:
        tokenizer.save(tokenizer_dir)
    return tokenizer


def build_data(config: ml_collections.ConfigDict, *, rows: tuple[int, int] | None = None,
               tokenizer_dir: str | None = None) -> LMData:
    """Reads the source, tokenizes it, splits it 90/10 (data.validation_fraction) and builds the streams.

    `rows` is the block of each global batch this process feeds (default: all of it).
    """
    data = config.data
    text = SOURCES.get(data.source)(data)
    tokenizer = _tokenizer_for(config, text, tokenizer_dir)
    tokens = tokenizer.encode(text)
    split_at = int(len(tokens) * (1.0 - data.validation_fraction))
    split_tokens = {"train": tokens[:split_at], "validation": tokens[split_at:]}
    global_batch = config.train.batch_size
    train = lm_batches.RandomWindowStream(split_tokens["train"], data.seq_len, global_batch, data.seed, rows)

    def eval_batches(split: str, num_batches: int) -> Iterator[lm_batches.Batch]:
        if split not in split_tokens:
            raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        return lm_batches.fixed_windows(split_tokens[split], data.seq_len, global_batch, data.seed, num_batches,
                                        rows)

    return LMData(tokenizer, train, eval_batches)
