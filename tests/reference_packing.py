"""Independent numpy references for the Grain packers (`llm_jax.data.packing`), written for tests only."""

from __future__ import annotations

import numpy as np


def segment_positions(segment_ids: np.ndarray) -> np.ndarray:
    """Position of each token inside its run of equal segment ids (restarting at 0 at every change)."""
    segment_ids = np.asarray(segment_ids)
    if len(segment_ids) == 0:
        return np.zeros(0, np.int32)
    index = np.arange(len(segment_ids))
    starts = np.r_[True, segment_ids[1:] != segment_ids[:-1]]
    return (index - np.maximum.accumulate(np.where(starts, index, 0))).astype(np.int32)


def concat_split_rows(docs: list[np.ndarray], length: int) -> list[dict[str, np.ndarray]]:
    """GPT-style rows: the documents' stream cut into rows of `length`, the last one padded with 0.

    Each row numbers the document pieces it holds 1, 2, ... (0 on padding); positions restart at every piece."""
    tokens = np.concatenate(docs).astype(np.int32)
    owner = np.concatenate([np.full(len(doc), index) for index, doc in enumerate(docs)])
    rows = []
    for start in range(0, len(tokens), length):
        piece, piece_owner = tokens[start:start + length], owner[start:start + length]
        segments = np.r_[1, 1 + np.cumsum(piece_owner[1:] != piece_owner[:-1])].astype(np.int32)
        pad = length - len(piece)
        rows.append({"tokens": np.pad(piece, (0, pad)),
                     "tokens_segment_ids": np.pad(segments, (0, pad)),
                     "tokens_positions": np.pad(segment_positions(segments), (0, pad))})
    return rows
