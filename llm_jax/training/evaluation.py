"""Evaluation over a number of batches of one split: eval/loss, eval/perplexity, eval/token_accuracy and the
target tokens they cover (eval/tokens)."""

from __future__ import annotations

import math

import jax

from llm_jax.sharding import batch_sharding, global_batch
from llm_jax.training.run import Run
from llm_jax.training.steps import make_eval_step


class Evaluator:
    """A jitted eval step over the run's mesh; sums stay on device until the last batch."""

    def __init__(self, run: Run):
        self.run = run
        self.sharding = batch_sharding(run.mesh, run.rules, stacked=False)
        self._step = jax.jit(make_eval_step(run.model),
                             in_shardings=(run.shardings.params, self.sharding))

    def evaluate(self, params, split: str, num_batches: int) -> dict[str, float]:
        totals = None
        for local in self.run.data.eval_batches(split, num_batches):
            sums = self._step(params, global_batch(local, self.sharding, 0, self.run.config.train.batch_size))
            totals = sums if totals is None else jax.tree.map(jax.numpy.add, totals, sums)
        totals = jax.device_get(totals)
        weight = max(float(totals["weight_sum"]), 1.0)
        loss = float(totals["loss_sum"]) / weight
        return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 700.0)),
                "eval/token_accuracy": float(totals["correct_sum"]) / weight, "eval/tokens": float(totals["weight_sum"])}
