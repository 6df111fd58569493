"""Language-model batches from one token stream: random windows whose offsets depend only on
(seed, step), so the data position is the step number and a resumed run sees exactly the same batches.

This is the nanoGPT sampling recipe (90/10 split of the token stream, random windows of seq_len + 1).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from llm_jax.data.packing import stack_rows
from llm_jax.errors import ConfigError
from llm_jax.tasks.base import Batch

_EVAL_STREAM = 0x5EED  # keeps evaluation windows apart from training windows for the same seed


def windows(tokens: np.ndarray, offsets: np.ndarray, seq_len: int) -> Batch:
    """inputs = tokens[o:o+T], targets = tokens[o+1:o+T+1] for each offset o."""
    index_BT = offsets[:, None] + np.arange(seq_len + 1)[None, :]
    span_BT = tokens[index_BT]
    return {"inputs": span_BT[:, :-1], "targets": span_BT[:, 1:],
            "weights": np.ones((len(offsets), seq_len), np.float32)}


class RandomWindowStream:
    """Training batches for this process: rows [start, stop) of the global batch of each step."""

    def __init__(self, tokens: np.ndarray, seq_len: int, global_batch: int, seed: int,
                 rows: tuple[int, int] | None = None):
        if len(tokens) <= seq_len + 1:
            raise ConfigError(f"the training split has {len(tokens)} tokens, fewer than data.seq_len+2={seq_len + 2}: "
                              "use more text (data.path) or a smaller data.seq_len")
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.global_batch = global_batch
        self.rows = rows or (0, global_batch)
        self.next_step = 0

    def _offsets(self, step: int) -> np.ndarray:
        rng = np.random.default_rng((self.seed, step))
        offsets = rng.integers(0, len(self.tokens) - self.seq_len - 1, size=self.global_batch)
        return offsets[self.rows[0]:self.rows[1]]

    def next_chunk(self, num_steps: int) -> Batch:
        """The next `num_steps` batches stacked on a leading axis: [num_steps, local_batch, seq_len]."""
        steps = [windows(self.tokens, self._offsets(self.next_step + i), self.seq_len) for i in range(num_steps)]
        self.next_step += num_steps
        return stack_rows(steps)

    def get_state(self) -> dict:
        return {"next_step": self.next_step, "seed": self.seed}

    def close(self) -> None:
        """Nothing runs in the background."""

    def set_state(self, state: dict) -> None:
        if "next_step" not in state:
            raise ConfigError(f"the checkpoint's data state {sorted(state)} was not written by the windows pipeline: "
                              "resume with the data.pipeline the run started with")
        if state["seed"] != self.seed:
            raise ConfigError(f"checkpoint was written with data.seed={state['seed']}, config has {self.seed}")
        self.next_step = int(state["next_step"])


def fixed_windows(tokens: np.ndarray, seq_len: int, global_batch: int, seed: int, num_batches: int,
                  rows: tuple[int, int] | None = None) -> Iterator[Batch]:
    """The same `num_batches` random-window batches every call: evaluations stay comparable."""
    if len(tokens) <= seq_len + 1:
        raise ConfigError(f"the evaluation split has {len(tokens)} tokens, fewer than data.seq_len+2={seq_len + 2}: "
                          "use more evaluation text (data.eval_path, data.validation_fraction) or a smaller "
                          "data.seq_len")
    start, stop = rows or (0, global_batch)
    for i in range(num_batches):
        rng = np.random.default_rng((seed, _EVAL_STREAM, i))
        offsets = rng.integers(0, len(tokens) - seq_len - 1, size=global_batch)
        yield windows(tokens, offsets[start:stop], seq_len)
