"""Row makers of the language-modelling objectives, used by the tasks in `llm_jax.tasks`.

`Tokenize` turns a record's document into {"tokens": int32 ids, eos appended when the tokenizer has one};
`NextTokenRows` turns a packed row of seq_len + 1 tokens into next-token inputs, targets and weights.
"""

from __future__ import annotations

import grain
import numpy as np

from llm_jax.data.sources import Record
from llm_jax.data.tokenizers import Tokenizer, special_ids


class Tokenize(grain.transforms.Map):
    """A record -> {"tokens": int32 ids of its "document", eos appended when the tokenizer has one}."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.eos_id = special_ids(tokenizer).get("eos")

    def map(self, record: Record) -> dict[str, np.ndarray]:
        tokens = self.tokenizer.encode(record["document"]).astype(np.int32)
        if self.eos_id is not None:
            tokens = np.append(tokens, np.int32(self.eos_id))
        return {"tokens": tokens}


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
