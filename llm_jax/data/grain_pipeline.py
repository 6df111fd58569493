"""The Grain input pipeline: records -> per-process shard -> per-epoch shuffle -> the task's rows (tokenized,
packed or masked) -> local batches, optionally in worker processes.

Each process reads the shard of the records that matches the block of the global batch its devices hold
(`Shard.from_rows`), so processes that hold the same rows (a replicated batch under tensor parallelism)
read the same shard, and different shards are disjoint and together cover every epoch. Every stage is
deterministic given data.seed, and the iterator's state (a few integers per stage, JSON) goes into each
checkpoint, so a resumed run continues with exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Sequence

import grain
import jax
import ml_collections
import numpy as np

from llm_jax.errors import ConfigError
from llm_jax.data.packing import stack_rows
from llm_jax.data.sources import Record
from llm_jax.data.tokenizers import Tokenizer
from llm_jax.tasks.base import AddDocument, Batch, RowContext, Task


@dataclasses.dataclass(frozen=True)
class Shard:
    index: int
    count: int

    @classmethod
    def from_rows(cls, rows: tuple[int, int], global_batch: int) -> "Shard":
        """This process feeds rows [start, stop) of every global batch: it reads shard start / (stop - start)."""
        start, stop = rows
        local = stop - start
        if local <= 0 or global_batch % local or start % local:
            raise ConfigError(f"this process feeds rows {start}..{stop} of a global batch of {global_batch}: the "
                              "pipeline needs equal, aligned row blocks per process; change train.batch_size or "
                              "the mesh")
        return cls(start // local, global_batch // local)


@dataclasses.dataclass(frozen=True)
class Documents:
    """One source's records of one split as a Grain MapDataset, and how to read a record's text."""

    records: grain.MapDataset
    text_of: Callable[[Record], str]
    weight: float = 1.0


def read_options(data: ml_collections.ConfigDict) -> grain.ReadOptions:
    """Grain's read-ahead: data.read_threads threads, each about 32 records ahead (none by default: on a small
    CPU host the threads cost more than they hide, and the device computes while the host prepares anyway)."""
    return grain.ReadOptions(num_threads=data.read_threads, prefetch_buffer_size=32 * data.read_threads)


def _shard(documents: Documents, shard: Shard, what: str) -> grain.MapDataset:
    records = documents.records[shard.index::shard.count]
    if len(records) == 0:
        raise ConfigError(f"{what} has {len(documents.records)} records, too few for {shard.count} input shards "
                          "(one per block of batch rows): use more data or fewer processes")
    return records


def _check_has_text(records: grain.MapDataset, text_of: Callable[[Record], str], what: str) -> None:
    """At least one record of the shard has text: the endless training stream would otherwise wait forever for
    a token. Reads records only up to the first with text (one, normally)."""
    for index in range(len(records)):
        if text_of(records[index]):
            return
    raise ConfigError(f"{what}: all {len(records)} records of this input shard have empty texts, so training "
                      "would wait forever for a token: check data.text_field (or data.text_columns) and the files")


def _context(tokenizer: Tokenizer, data: ml_collections.ConfigDict, training: bool) -> RowContext:
    return RowContext(tokenizer, data, read_options(data), training)


def train_batches(components: Sequence[Documents], tokenizer: Tokenizer, data: ml_collections.ConfigDict,
                  shard: Shard, local_batch: int, task: Task) -> grain.IterDataset:
    """Endless training batches of this shard: documents reshuffled every epoch (and mixed by weight), turned
    into rows by the task (`llm_jax.tasks.base.Task.rows`)."""
    shuffled = []
    for index, documents in enumerate(components):
        what = "the training split" if len(components) == 1 else f"data.mixture[{index}]"
        records = _shard(documents, shard, what)
        _check_has_text(records, documents.text_of, what)
        shuffled.append(records.shuffle(seed=data.seed + index).repeat().map(AddDocument(documents.text_of)))
    if len(shuffled) == 1:
        mixed = shuffled[0]
    else:
        mixed = grain.MapDataset.mix(shuffled, [documents.weight for documents in components])
    batches = task.rows(mixed, _context(tokenizer, data, training=True)).batch(local_batch, drop_remainder=True)
    if data.num_workers:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # Grain's workers read absl flags; outside an absl app use the defaults
            flags.FLAGS.mark_as_parsed()
        batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=data.num_workers))
    return batches


def eval_rows(documents: Documents, tokenizer: Tokenizer, data: ml_collections.ConfigDict,
              shard: Shard, task: Task) -> grain.IterDataset:
    """Every row of this shard of an evaluation split, in order (no shuffle, one pass)."""
    records = _shard(documents, shard, "the evaluation split").map(AddDocument(documents.text_of))
    return task.rows(records, _context(tokenizer, data, training=False))


def padded_batches(rows: Iterator[Batch], local_batch: int, num_batches: int) -> Iterator[Batch]:
    """Exactly `num_batches` batches: rows in order, then rows of zeros (weight 0) once the split is used up,
    so every process runs the same number of evaluation steps."""
    template = None
    for _ in range(num_batches):
        block = [row for _, row in zip(range(local_batch), rows)]
        if block:
            template = template or {key: np.zeros_like(value) for key, value in block[0].items()}
        if template is None:
            raise ConfigError("the evaluation split produced no rows for this process")
        block += [template] * (local_batch - len(block))
        yield stack_rows(block)


def count_batches(rows: Iterator[Batch], local_batch: int) -> int:
    """Batches needed for every row of this process, agreed across processes (the largest count)."""
    local = -(-sum(1 for _ in rows) // local_batch)
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.array(local, np.int32))))


class BatchStream:
    """The training stream the host loop consumes: stacked chunks of batches and a JSON iterator state."""

    def __init__(self, dataset: grain.IterDataset):
        self._iterator = iter(dataset)

    def next_chunk(self, num_steps: int) -> Batch:
        """The next `num_steps` batches stacked on a leading axis: [num_steps, local_batch, seq_len]."""
        return stack_rows([next(self._iterator) for _ in range(num_steps)])

    def get_state(self) -> dict[str, Any]:
        return {"grain": self._iterator.get_state()}

    def close(self) -> None:
        """Stops prefetching and worker processes."""
        self._iterator.close()

    def set_state(self, state: dict[str, Any]) -> None:
        if "grain" not in state:
            raise ConfigError(f"the checkpoint's data state {sorted(state)} was not written by the grain pipeline: "
                              "resume with the data.pipeline the run started with")
        try:
            self._iterator.set_state(state["grain"])
        except (TypeError, KeyError, ValueError) as error:
            raise ConfigError(f"the checkpoint's data-iterator state does not fit this pipeline ({error}): resume "
                              "with the data settings the run started with (data.num_workers, data.mixture, "
                              "data.packing, ...)") from error
