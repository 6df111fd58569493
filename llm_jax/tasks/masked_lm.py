"""BERT pretraining: masked LM (15% of tokens; 80% [MASK], 10% random, 10% unchanged) plus next-sentence or
sentence-order prediction on pairs of consecutive sentence spans of each document.

Rows are made per record with an RNG derived from (data.seed, the record's position in the stream), so
masking and pairing are the same on every host and a resumed run masks exactly as an uninterrupted one.
"""

from __future__ import annotations

import math
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.errors import ConfigError
from llm_jax.data import masking
from llm_jax.data.sources import Record
from llm_jax.models.outputs import Outputs
from llm_jax.tasks.base import Batch, Field, LossTerms, RowContext, Task, cross_entropy_terms, token_field
from llm_jax.tasks.metrics import weighted_cross_entropy

_MLM_STREAM = 0x4D4C4D  # keeps the masking RNG apart from other uses of data.seed


def word_starts(tokenizer: Any, ids: np.ndarray) -> np.ndarray:
    """Where words begin among `ids`, from the tokenizer's pieces (SentencePiece "▁" or WordPiece "##")."""
    if not hasattr(tokenizer, "pieces"):
        raise ConfigError(f"data.whole_word_masking needs word boundaries, which the {tokenizer.kind} tokenizer "
                          "does not give: use data.tokenizer=sentencepiece or wordpiece")
    style = "wordpiece" if tokenizer.kind == "wordpiece" else "sentencepiece"
    return masking.word_starts_from_pieces(tokenizer.pieces([int(i) for i in ids]), style)


class MaskedExamples:
    """(index, record) -> the masked pair rows of one document (a list: one per chunk of sentences)."""

    def __init__(self, records: grain.MapDataset, context: RowContext):
        self.records, self.tokenizer, self.data = records, context.tokenizer, context.data
        self.special = context.require_special("cls", "sep", "pad", "mask")
        self.special_set = sorted(set(self.special.values()))
        self.pair = self.data.sentence_task != "none"
        self.predictions = max_predictions(self.data)

    def _sentences(self, record: Record) -> list[np.ndarray]:
        return [self.tokenizer.encode(s).astype(np.int32) for s in masking.split_sentences(record["document"])]

    def _random_sentences(self, rng: np.random.Generator) -> list[np.ndarray]:
        try:
            size = len(self.records)
        except TypeError:
            size = 1 << 30
        other = self._sentences(self.records[int(rng.integers(0, min(size, 1 << 30)))])
        start = int(rng.integers(0, len(other))) if other else 0
        return other[start:]

    def _row(self, chunk: list[np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        data, special = self.data, self.special
        a, b, label = masking.sentence_pair(chunk, rng, data.sentence_task, self._random_sentences)
        row = masking.pair_row(a, b, data.seq_len, cls_id=special["cls"], sep_id=special["sep"],
                               pad_id=special["pad"])
        starts = word_starts(self.tokenizer, row["inputs"]) if data.whole_word_masking else None
        inputs, targets, weights = masking.mask_tokens(
            row["inputs"], rng, vocab_size=self.tokenizer.vocab_size, mask_id=special["mask"],
            special_ids=self.special_set, probability=data.mlm_probability, word_starts=starts)
        chosen = np.flatnonzero(weights)[:self.predictions]  # the rare surplus of whole-word masking is dropped
        positions = np.zeros(self.predictions, np.int32)
        positions[:len(chosen)] = chosen
        mlm_weights = np.zeros(self.predictions, np.float32)
        mlm_weights[:len(chosen)] = 1.0
        return {"inputs": inputs, "mlm_positions": positions, "targets": targets[positions] * (mlm_weights > 0),
                "mlm_weights": mlm_weights, "token_types": row["token_types"],
                "segment_ids": row["segment_ids"], "sentence_labels": np.int32(label),
                "sentence_weights": np.float32(self.pair)}

    def __call__(self, index: int, record: Record) -> list[dict[str, np.ndarray]]:
        rng = np.random.default_rng((self.data.seed, _MLM_STREAM, index))
        budget = self.data.seq_len - (3 if self.pair else 2)
        return [self._row(chunk, rng) for chunk in masking.group_sentences(self._sentences(record), budget)]


def max_predictions(data: Any) -> int:
    """Masked positions a row holds (BERT's max_predictions_per_seq): the masking budget plus a margin for
    whole words."""
    return min(data.seq_len, math.ceil(data.seq_len * data.mlm_probability * 1.25) + 1)


class _Flatten(grain.experimental.FlatMapTransform):
    max_fan_out = 1 << 12

    def flat_map(self, rows: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        return rows


class MaskedLM(Task):
    """Masked LM + data.sentence_task (nsp, sop or none); metrics eval/mlm_loss, eval/mlm_accuracy and
    eval/nsp_accuracy or eval/sop_accuracy; eval/loss is their summed loss."""

    name = "masked_lm"
    families = ("encoder",)
    vocab_terms = ("mlm",)  # not the two-class sentence head

    def heads(self) -> tuple[str, ...]:
        return ("mlm", "nsp") if self.config.data.sentence_task != "none" else ("mlm",)

    def validate(self) -> None:
        super().validate()
        data = self.config.data
        if data.sentence_task not in masking.SENTENCE_TASKS:
            raise ConfigError(f"data.sentence_task={data.sentence_task!r} must be one of {masking.SENTENCE_TASKS}")
        if not 0.0 < data.mlm_probability < 1.0:
            raise ConfigError(f"data.mlm_probability={data.mlm_probability} must be in (0, 1)")
        if data.pipeline != "grain":
            raise ConfigError("data.objective=masked_lm reads documents: set data.pipeline=grain")

    def rows(self, records: grain.MapDataset, context: RowContext) -> grain.IterDataset:
        examples = records.map_with_index(MaskedExamples(records, context))
        return grain.experimental.FlatMapIterDataset(examples.to_iter_dataset(context.read_options), _Flatten())

    def batch_spec(self) -> dict[str, Field]:
        seq_len, predictions = self.config.data.seq_len, max_predictions(self.config.data)
        return {"inputs": token_field(seq_len), "mlm_positions": Field((predictions,), np.int32, ("predictions",)),
                "targets": Field((predictions,), np.int32, ("predictions",)),
                "mlm_weights": Field((predictions,), np.float32, ("predictions",)), "token_types": token_field(seq_len),
                "segment_ids": token_field(seq_len), "sentence_labels": Field((), np.int32, ()),
                "sentence_weights": Field((), np.float32, ())}

    def model_inputs(self, batch: Batch) -> dict[str, jax.Array | None]:
        return {"tokens_BT": batch["inputs"], "segment_ids_BT": batch["segment_ids"],
                "token_types_BT": batch["token_types"], "prediction_positions_BP": batch["mlm_positions"]}

    def loss_weights(self, batch: Batch) -> dict[str, jax.Array]:
        weights = {"mlm": jnp.sum(batch["mlm_weights"])}
        if "nsp" in self.heads():
            weights["sentence"] = jnp.sum(batch["sentence_weights"])
        return weights

    def loss_terms(self, outputs: Outputs, batch: Batch) -> LossTerms:
        mlm_sum, mlm_weight, _ = cross_entropy_terms(outputs.heads["mlm"], batch["targets"], batch["mlm_weights"])
        terms = {"mlm": (mlm_sum, mlm_weight)}
        if "nsp" in outputs.heads:
            terms["sentence"] = weighted_cross_entropy(outputs.heads["nsp"], batch["sentence_labels"],
                                                       batch["sentence_weights"])
        return terms

    def vocab_logits(self, outputs: Outputs, batch: Batch) -> dict[str, tuple[jax.Array, jax.Array]]:
        return {"mlm": (outputs.heads["mlm"], batch["mlm_weights"])}

    def tokens(self, batch: Batch) -> jax.Array:
        return jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32)

    def eval_sums(self, outputs: Outputs, batch: Batch) -> dict[str, jax.Array]:
        mlm_sum, mlm_weight, mlm_correct = cross_entropy_terms(outputs.heads["mlm"], batch["targets"],
                                                               batch["mlm_weights"])
        sums = {"mlm_loss_sum": mlm_sum, "mlm_weight_sum": mlm_weight, "mlm_correct_sum": mlm_correct}
        if "nsp" in outputs.heads:
            logits_B2, weights_B = outputs.heads["nsp"], batch["sentence_weights"]
            loss_sum, weight_sum = weighted_cross_entropy(logits_B2, batch["sentence_labels"], weights_B)
            correct = (jnp.argmax(logits_B2, -1) == batch["sentence_labels"]).astype(jnp.float32)
            sums.update(sentence_loss_sum=loss_sum, sentence_weight_sum=weight_sum,
                        sentence_correct_sum=jnp.sum(correct * weights_B))
        return sums

    def finalize(self, sums: dict[str, np.ndarray]) -> dict[str, float]:
        mlm_weight = max(float(sums["mlm_weight_sum"]), 1.0)
        mlm_loss = float(sums["mlm_loss_sum"]) / mlm_weight
        metrics = {"eval/mlm_loss": mlm_loss, "eval/mlm_accuracy": float(sums["mlm_correct_sum"]) / mlm_weight,
                   "eval/mlm_perplexity": math.exp(min(mlm_loss, 700.0)), "eval/tokens": float(sums["mlm_weight_sum"])}
        loss = mlm_loss
        if "sentence_loss_sum" in sums:
            weight = max(float(sums["sentence_weight_sum"]), 1.0)
            sentence_loss = float(sums["sentence_loss_sum"]) / weight
            name = self.config.data.sentence_task
            metrics[f"eval/{name}_loss"] = sentence_loss
            metrics[f"eval/{name}_accuracy"] = float(sums["sentence_correct_sum"]) / weight
            loss += sentence_loss
        metrics["eval/loss"] = loss
        return metrics
