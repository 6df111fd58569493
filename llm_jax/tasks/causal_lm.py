"""Causal language modelling (GPT): next-token prediction over documents packed into rows."""

from __future__ import annotations

import math

import grain
import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.data.objectives import NextTokenRows, Tokenize
from llm_jax.data.packing import PACKINGS
from llm_jax.models.outputs import Outputs
from llm_jax.tasks.base import Batch, Field, LossTerms, RowContext, Task, cross_entropy_terms, token_field


class CausalLM(Task):
    """Rows of seq_len + 1 packed tokens -> inputs/targets/weights (+ segment ids and positions with
    data.separate_documents on the grain pipeline); metrics eval/loss, eval/perplexity, eval/token_accuracy."""

    name = "causal_lm"
    families = ("decoder",)
    vocab_terms = ("lm",)

    def heads(self) -> tuple[str, ...]:
        return ("lm",)

    def _packed_segments(self) -> bool:
        data = self.config.data
        return data.pipeline == "grain" and data.separate_documents

    def rows(self, records: grain.MapDataset, context: RowContext) -> grain.IterDataset:
        data = context.data
        documents = records.map(Tokenize(context.tokenizer)).to_iter_dataset(context.read_options)
        packed = PACKINGS.get(data.packing)(documents, data.seq_len + 1, data)
        return packed.map(NextTokenRows(data.separate_documents))

    def batch_spec(self) -> dict[str, Field]:
        seq_len = self.config.data.seq_len
        spec = {"inputs": token_field(seq_len), "targets": token_field(seq_len),
                "weights": token_field(seq_len, np.float32)}
        if self._packed_segments():
            spec.update(segment_ids=token_field(seq_len), positions=token_field(seq_len))
        return spec

    def model_inputs(self, batch: Batch) -> dict[str, jax.Array | None]:
        return {"tokens_BT": batch["inputs"], "positions_BT": batch.get("positions"),
                "segment_ids_BT": batch.get("segment_ids")}

    def loss_weights(self, batch: Batch) -> dict[str, jax.Array]:
        return {"lm": jnp.sum(batch["weights"])}

    def loss_terms(self, outputs: Outputs, batch: Batch) -> LossTerms:
        loss_sum, weight_sum, _ = cross_entropy_terms(outputs.heads["lm"], batch["targets"], batch["weights"])
        return {"lm": (loss_sum, weight_sum)}

    def vocab_logits(self, outputs: Outputs, batch: Batch) -> dict[str, tuple[jax.Array, jax.Array]]:
        return {"lm": (outputs.heads["lm"], batch["weights"])}

    def tokens(self, batch: Batch) -> jax.Array:
        return jnp.sum(batch["weights"])

    def eval_sums(self, outputs: Outputs, batch: Batch) -> dict[str, jax.Array]:
        loss_sum, weight_sum, correct_sum = cross_entropy_terms(outputs.heads["lm"], batch["targets"],
                                                                batch["weights"])
        return {"loss_sum": loss_sum, "weight_sum": weight_sum, "correct_sum": correct_sum}

    def finalize(self, sums: dict[str, np.ndarray]) -> dict[str, float]:
        weight = max(float(sums["weight_sum"]), 1.0)
        loss = float(sums["loss_sum"]) / weight
        return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 700.0)),
                "eval/token_accuracy": float(sums["correct_sum"]) / weight, "eval/tokens": float(sums["weight_sum"])}
