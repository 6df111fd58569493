"""Evaluation over a number of batches of one split: the task's metric sums, summed over batches on device,
then turned into eval/* metrics by the task (loss, perplexity and token accuracy for causal LM; MLM,
sentence-pair, accuracy and F1 metrics for the encoder tasks)."""

from __future__ import annotations

from typing import Callable, Iterable

import jax
import numpy as np

from llm_jax.sharding import batch_shardings, global_batch
from llm_jax.training.run import Run
from llm_jax.training.steps import make_eval_step


class Evaluator:
    """A jitted eval step over the run's mesh; sums stay on device until the last batch."""

    def __init__(self, run: Run):
        self.run = run
        self.shardings = batch_shardings(run.mesh, run.rules, run.task.batch_spec(), stacked=False)
        self.step = jax.jit(make_eval_step(run.model, run.task), in_shardings=(run.shardings.params, self.shardings))
        self.last_sums: dict[str, np.ndarray] = {}

    def evaluate(self, params, split: str, num_batches: int,
                 views: Callable[[dict[str, np.ndarray]], Iterable[dict[str, np.ndarray]]] | None = None
                 ) -> dict[str, float]:
        """The task's metrics over `num_batches` batches of `split`; `views` turns each batch into the batches
        actually scored (the sliding windows of llm_jax.training.length_eval), one step per view."""
        totals = None
        for local in self.run.data.eval_batches(split, num_batches):
            for view in views(local) if views is not None else (local,):
                sums = self.step(params, global_batch(view, self.shardings, 0, self.run.config.train.batch_size))
                totals = sums if totals is None else jax.tree.map(jax.numpy.add, totals, sums)
        self.last_sums = jax.device_get(totals)
        return self.run.task.finalize(self.last_sums)
