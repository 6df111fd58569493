"""The data interface the trainer consumes: a tokenizer, a resumable training stream, evaluation batches.

`build_data` reads `config.data.source`, gets the run's tokenizer (DIR/tokenizer when the run has one, else
trained on or loaded for the train split) and builds the `data.pipeline`:

* `grain`: documents sharded by process, shuffled per epoch, tokenized, packed by the objective, batched
  (`llm_jax.data.grain_pipeline`); the default.
* `windows`: nanoGPT's random windows of one token stream, step-indexed (`llm_jax.data.lm_batches`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Iterator, Protocol

import grain
import jax
import ml_collections

from llm_jax.errors import ConfigError
from llm_jax.data import grain_pipeline, lm_batches
from llm_jax.data.sources import SourceSplits, source_splits
from llm_jax.data.tokenizers import TOKENIZER_FILE, TOKENIZERS, Tokenizer, load_tokenizer
from llm_jax.registry import Registry
from llm_jax.tasks import build_task
from llm_jax.tasks.base import Batch


class TrainStream(Protocol):
    def next_chunk(self, num_steps: int) -> Batch: ...

    def get_state(self) -> dict: ...

    def set_state(self, state: dict) -> None: ...

    def close(self) -> None: ...


@dataclasses.dataclass
class LMData:
    tokenizer: Tokenizer
    train: TrainStream
    eval_batches: Callable[[str, int], Iterator[Batch]]  # (split, num_batches; -1 = all)
    skipped_records: int = 0


PIPELINES: Registry[Callable[..., LMData]] = Registry("data pipeline")


def _tokenizer_for(config: ml_collections.ConfigDict, text: Callable[[], str], tokenizer_dir: str | None) -> Tokenizer:
    """The run's tokenizer: loaded from DIR/tokenizer when the run already has one, else fitted on `text()` (the
    same on every process) and saved by process 0."""
    if tokenizer_dir and os.path.exists(os.path.join(tokenizer_dir, TOKENIZER_FILE)):
        tokenizer = load_tokenizer(tokenizer_dir)
        if tokenizer.kind != config.data.tokenizer:
            raise ConfigError(f"data.tokenizer={config.data.tokenizer!r} but {tokenizer_dir} holds a "
                              f"{tokenizer.kind!r} tokenizer; use a fresh --workdir")
        return tokenizer
    tokenizer = TOKENIZERS.get(config.data.tokenizer).fit(text(), config.data)
    if tokenizer_dir and jax.process_index() == 0:
        tokenizer.save(tokenizer_dir)
    return tokenizer


def _check_train_split(source: SourceSplits, data: ml_collections.ConfigDict) -> None:
    if data.train_split not in source.splits:
        raise ConfigError(f"data.train_split={data.train_split!r} is not a split of data.source={data.source!r} "
                          f"(it has {sorted(source.splits)})")


def _split_documents(source: SourceSplits, data: ml_collections.ConfigDict,
                     weight: float = 1.0) -> dict[str, grain_pipeline.Documents]:
    """The source's splits as Documents; without an evaluation split, its last data.validation_fraction of
    the train records are held out as data.eval_split."""
    _check_train_split(source, data)
    splits = {name: grain_pipeline.Documents(grain.MapDataset.source(records), source.text_of, weight)
              for name, records in source.splits.items()}
    if data.eval_split not in splits:
        train = splits[data.train_split].records
        held_out = max(1, round(len(train) * data.validation_fraction))
        if len(train) - held_out < 1:
            raise ConfigError(f"the train split has {len(train)} record(s): too few to hold out an evaluation "
                              "split; set data.eval_path, or data.split_by=line or blank_line to cut the text into "
                              "more documents")
        splits[data.train_split] = dataclasses.replace(splits[data.train_split], records=train[:-held_out])
        splits[data.eval_split] = dataclasses.replace(splits[data.train_split], records=train[-held_out:])
    return splits


def _texts(documents: grain_pipeline.Documents, max_chars: int) -> Iterator[str]:
    used = 0
    for record in documents.records:
        if used >= max_chars:
            return
        text = documents.text_of(record)[:max_chars - used]
        used += len(text)
        yield text


def tokenizer_text(components: list[grain_pipeline.Documents], max_chars: int) -> str:
    """Up to max_chars characters of train documents, shared among mixture components by weight."""
    total = sum(documents.weight for documents in components)
    return "\n".join(text for documents in components
                     for text in _texts(documents, int(max_chars * documents.weight / total)))


@PIPELINES.register("grain")
def build_grain_data(config: ml_collections.ConfigDict, rows: tuple[int, int],
                     tokenizer_dir: str | None) -> LMData:
    data, global_batch = config.data, config.train.batch_size
    task = build_task(config)
    source = source_splits(data)
    splits = _split_documents(source, data)
    skipped = source.skipped_records
    components = [splits[data.train_split]]
    if data.mixture:
        components = []
        for component in data.mixture:
            part = source_splits(data, component)
            skipped += part.skipped_records
            components.append(_split_documents(part, data, float(component["weight"]))[data.train_split])
    tokenizer = _tokenizer_for(config, lambda: tokenizer_text(components, data.tokenizer_max_chars), tokenizer_dir)
    shard, local_batch = grain_pipeline.Shard.from_rows(rows, global_batch), rows[1] - rows[0]
    train = grain_pipeline.BatchStream(grain_pipeline.train_batches(components, tokenizer, data, shard, local_batch,
                                                                             task))

    @functools.cache
    def rows_of(split: str) -> grain.IterDataset:
        if split not in splits:
            raise ValueError(f"unknown split {split!r}; data.source={data.source!r} has {', '.join(sorted(splits))}")
        return grain_pipeline.eval_rows(splits[split], tokenizer, data, shard, task)

    @functools.cache
    def whole_split_batches(split: str) -> int:
        return grain_pipeline.count_batches(iter(rows_of(split)), local_batch)

    def eval_batches(split: str, num_batches: int) -> Iterator[Batch]:
        count = whole_split_batches(split) if num_batches == -1 else num_batches
        return grain_pipeline.padded_batches(iter(rows_of(split)), local_batch, count)

    return LMData(tokenizer, train, eval_batches, skipped)


@PIPELINES.register("windows")
def build_window_data(config: ml_collections.ConfigDict, rows: tuple[int, int],
                      tokenizer_dir: str | None) -> LMData:
    """The train records joined into one text; evaluation on the eval split's text, or on the last
    data.validation_fraction of the token stream."""
    data, global_batch = config.data, config.train.batch_size
    source = source_splits(data)
    _check_train_split(source, data)

    def joined(split: str) -> str:
        return "\n\n".join(source.text_of(record) for record in source.splits[split])

    text = joined(data.train_split)
    tokenizer = _tokenizer_for(config, lambda: text, tokenizer_dir)
    tokens = tokenizer.encode(text)
    if data.eval_split in source.splits and data.eval_split != data.train_split:
        split_tokens = {data.train_split: tokens, data.eval_split: tokenizer.encode(joined(data.eval_split))}
    else:
        split_at = int(len(tokens) * (1.0 - data.validation_fraction))
        split_tokens = {data.train_split: tokens[:split_at], data.eval_split: tokens[split_at:]}
    train = lm_batches.RandomWindowStream(split_tokens[data.train_split], data.seq_len, global_batch, data.seed, rows)
    if len(split_tokens[data.eval_split]) <= data.seq_len + 1:  # found now, not at the first evaluation
        raise ConfigError(f"the evaluation split {data.eval_split!r} has {len(split_tokens[data.eval_split])} tokens, "
                          f"fewer than data.seq_len+2={data.seq_len + 2}: use more evaluation text (data.eval_path, "
                          "data.validation_fraction) or a smaller data.seq_len")

    def eval_batches(split: str, num_batches: int) -> Iterator[Batch]:
        if split not in split_tokens:
            raise ValueError(f"unknown split {split!r}; choose one of {', '.join(split_tokens)}")
        if num_batches < 1:
            raise ValueError(f"{num_batches} evaluation batches: data.pipeline=windows samples a fixed number of "
                             "windows (>= 1); the whole split (-1) needs data.pipeline=grain")
        return lm_batches.fixed_windows(split_tokens[split], data.seq_len, global_batch, data.seed, num_batches,
                                        rows)

    return LMData(tokenizer, train, eval_batches, source.skipped_records)


def build_data(config: ml_collections.ConfigDict, *, rows: tuple[int, int] | None = None,
               tokenizer_dir: str | None = None) -> LMData:
    """The run's data; `rows` is the block of each global batch this process feeds (default: all of it)."""
    rows = rows or (0, config.train.batch_size)
    return PIPELINES.get(config.data.pipeline)(config, rows, tokenizer_dir)


def describe(data: LMData) -> dict[str, Any]:
    """What the run logs about its data at the start."""
    return {"data/skipped_records": data.skipped_records, "data/vocab_size": data.tokenizer.vocab_size}
