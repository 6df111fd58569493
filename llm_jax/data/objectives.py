"""Training objectives as pipeline hooks: tokenized documents in, model examples out.

An objective is called with a Grain IterDataset of tokenized documents ({"tokens": int32 [n]}, eos appended
when the tokenizer has one) and returns an IterDataset of rows with "inputs", "targets" and "weights"
([seq_len] each) plus whatever else its model family reads ("segment_ids", "positions"). Masked LM and span
corruption register here beside the causal LM, packing with `data.packing` the same way.
"""

from __future__ import annotations

from typing import Any, Protocol

import ml_collections
import numpy as np

from llm_jax.data.packing import PACKINGS
from llm_jax.registry import Registry


class Objective(Protocol):
    def __call__(self, documents: Any, data: ml_collections.ConfigDict, special_ids: dict[str, int]) -> Any: ...


OBJECTIVES: Registry[Objective] = Registry("objective")


class NextTokenRows:
    """A packed row of seq_len + 1 tokens -> next-token inputs/targets; with `separate_documents`, segment ids
    and positions come along and targets in another document than their input (or padding) get weight 0."""

    def __init__(self, separate_documents: bool):
        self.separate_documents = separate_documents

    def __call__(self, row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tokens, segments = row["tokens"], row["tokens_segment_ids"]
        same_document = (segments[1:] == segments[:-1]) & (segments[:-1] > 0)
        example = {"inputs": tokens[:-1], "targets": tokens[1:]}
        if self.separate_documents:
            example["weights"] = same_document.astype(np.float32)
            example["segment_ids"] = segments[:-1]
            example["positions"] = row["tokens_positions"][:-1]
        else:
            example["weights"] = (segments[1:] > 0).astype(np.float32)  # only padding is masked
        return example


@OBJECTIVES.register("causal_lm")
def causal_lm(documents: Any, data: ml_collections.ConfigDict, special_ids: dict[str, int]) -> Any:
    """GPT-style next-token prediction over documents packed into rows of seq_len + 1 tokens."""
    rows = PACKINGS.get(data.packing)(documents, data.seq_len + 1, data)
    return rows.map(NextTokenRows(data.separate_documents))
