"""How documents become fixed-length rows: the packers of the Grain pipeline, chosen by `data.packing`.

* `concat_split` (GPT-style): documents concatenated into one stream and cut into disjoint rows; a long
  document continues in the next row.
* `first_fit` (T5/seqio-style): whole documents placed first-fit into `data.packing_bins` open rows and padded;
  a document longer than a row is cut into row-sized pieces first, so no token is lost.

Both take a Grain IterDataset of {"tokens": [n]} documents and yield rows {"tokens", "tokens_segment_ids" (1, 2,
... per document in the row, 0 on padding), "tokens_positions" (restarting at 0 per segment)} whose iterators
checkpoint with the pipeline. The tasks turn them into model rows (`llm_jax.data.objectives.NextTokenRows`), and
`python -m llm_jax.data inspect` shows them. tests/reference_packing.py holds an independent numpy reference.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

from llm_jax.registry import Registry

Example = dict[str, np.ndarray]


PACKINGS: Registry = Registry("packing")


@PACKINGS.register("concat_split")
def grain_concat_split(docs: grain.IterDataset, length: int, data: Any) -> grain.IterDataset:
    """Documents concatenated and cut into disjoint rows (a long document continues in the next row)."""
    return grain.experimental.ConcatThenSplitIterDataset(docs, length_struct={"tokens": length})


@PACKINGS.register("first_fit")
def grain_first_fit(docs: grain.IterDataset, length: int, data: Any) -> grain.IterDataset:
    """Whole documents placed first-fit into data.packing_bins open rows, padded; longer documents are cut
    into pieces of `length` first, so no token is lost."""
    pieces = grain.experimental.FlatMapIterDataset(docs, _SplitLongDocuments(length))
    return grain.experimental.FirstFitPackIterDataset(pieces, length_struct={"tokens": length},
                                                      num_packing_bins=data.packing_bins, seed=data.seed)


class _SplitLongDocuments(grain.experimental.FlatMapTransform):
    """A Grain FlatMapTransform: a document as pieces of at most `length` tokens."""

    def __init__(self, length: int):
        self.length = length
        self.max_fan_out = 1 << 16

    def flat_map(self, document: dict) -> list[dict]:
        tokens = document["tokens"]
        return [{"tokens": tokens[i:i + self.length]} for i in range(0, max(len(tokens), 1), self.length)]


def stack_rows(rows: list[Example]) -> Example:
    """Rows (or batches) with the same keys stacked on a new leading axis, per key."""
    return {key: np.stack([row[key] for row in rows]) for key in rows[0]}


