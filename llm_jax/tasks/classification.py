"""Fine-tuning tasks on labelled records: sequence classification (single texts or pairs) and token
classification (sequence labelling, optionally through a linear-chain CRF).

Labels are indices into data.labels, checked against that list where the records are read (file and line).
"""

from __future__ import annotations

import grain
import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.errors import ConfigError
from llm_jax.data import masking
from llm_jax.data.sources import Record
from llm_jax.models import crf
from llm_jax.models.outputs import Outputs
from llm_jax.tasks.base import Batch, Field, LossTerms, RowContext, Task, token_field
from llm_jax.tasks.metrics import (class_report, classification_metrics, confusion, per_class_metrics,
                                   weighted_cross_entropy)


class _LabelledTask(Task):
    """What both fine-tuning tasks share: data.labels, the confusion matrix and its metrics."""

    families = ("encoder",)

    def num_labels(self) -> int:
        return len(self.config.data.labels)

    def validate(self) -> None:
        super().validate()
        labels = tuple(self.config.data.labels)
        if len(labels) < 2:
            raise ConfigError(f"data.objective={self.name!r} needs data.labels, the class names (at least 2), "
                              f"got {labels}")
        if self.config.model.num_labels not in (None, len(labels)):
            raise ConfigError(f"model.num_labels={self.config.model.num_labels} but data.labels has {len(labels)} "
                              "names: leave model.num_labels unset")
        if self.config.data.pipeline != "grain":
            raise ConfigError(f"data.objective={self.name!r} reads labelled records: set data.pipeline=grain")

    def finalize(self, sums: dict[str, np.ndarray]) -> dict[str, float]:
        weight = max(float(sums["weight_sum"]), 1.0)
        metrics = {"eval/loss": float(sums["loss_sum"]) / weight, **classification_metrics(sums["confusion"]),
                   "eval/examples": float(sums["weight_sum"])}
        metrics.update(per_class_metrics(sums["confusion"], self.config.data.labels))
        return metrics

    def report(self, sums: dict[str, np.ndarray]) -> str:
        return class_report(sums["confusion"], self.config.data.labels)


class EncodePair(grain.transforms.Map):
    """A labelled record -> [CLS] text [SEP] (text_b [SEP]) with token types and its label."""

    def __init__(self, context: RowContext):
        self.tokenizer, self.seq_len = context.tokenizer, context.data.seq_len
        self.special = context.require_special("cls", "sep", "pad")
        self.num_labels = len(context.data.labels)
        self.label_field, self.text_b_field = context.data.label_field, context.data.text_b_field

    def _second_text(self, record: Record) -> str:
        """A local pair's "text_b", or a TFDS catalog record's data.text_b_field (e.g. glue/mrpc's sentence2)."""
        text = record.get("text_b") or (record.get(self.text_b_field) if self.text_b_field else None) or ""
        return text.decode("utf-8") if isinstance(text, bytes) else str(text)

    def map(self, record: Record) -> dict[str, np.ndarray]:
        label = int(record.get(self.label_field, record.get("label")) if self.label_field else record["label"])
        if not 0 <= label < self.num_labels:
            raise ConfigError(f"record label {label} is outside data.labels ({self.num_labels} classes)")
        a = self.tokenizer.encode(record.get("text", record["document"]))
        second = self._second_text(record)
        b = self.tokenizer.encode(second) if second else np.zeros(0, np.int32)
        row = masking.pair_row(a, b, self.seq_len, cls_id=self.special["cls"], sep_id=self.special["sep"],
                               pad_id=self.special["pad"])
        return {**row, "labels": np.int32(label), "label_weights": np.float32(1.0)}


class SequenceClassification(_LabelledTask):
    """One label per text or text pair from the pooled output; eval/accuracy, eval/f1 (macro) and per-class
    precision/recall."""

    name = "classification"

    def heads(self) -> tuple[str, ...]:
        return ("classifier",)

    def rows(self, records: grain.MapDataset, context: RowContext) -> grain.IterDataset:
        return records.map(EncodePair(context)).to_iter_dataset(context.read_options)

    def batch_spec(self) -> dict[str, Field]:
        seq_len = self.config.data.seq_len
        return {"inputs": token_field(seq_len), "token_types": token_field(seq_len),
                "segment_ids": token_field(seq_len), "labels": Field((), np.int32, ()),
                "label_weights": Field((), np.float32, ())}

    def model_inputs(self, batch: Batch) -> dict[str, jax.Array | None]:
        return {"tokens_BT": batch["inputs"], "segment_ids_BT": batch["segment_ids"],
                "token_types_BT": batch["token_types"]}

    def loss_weights(self, batch: Batch) -> dict[str, jax.Array]:
        return {"classification": jnp.sum(batch["label_weights"])}

    def loss_terms(self, outputs: Outputs, batch: Batch) -> LossTerms:
        return {"classification": weighted_cross_entropy(outputs.heads["classifier"], batch["labels"],
                                                         batch["label_weights"])}

    def tokens(self, batch: Batch) -> jax.Array:
        return jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32)

    def eval_sums(self, outputs: Outputs, batch: Batch) -> dict[str, jax.Array]:
        logits_BC = outputs.heads["classifier"]
        loss_sum, weight_sum = weighted_cross_entropy(logits_BC, batch["labels"], batch["label_weights"])
        return {"loss_sum": loss_sum, "weight_sum": weight_sum,
                "confusion": confusion(jnp.argmax(logits_BC, -1), batch["labels"], batch["label_weights"],
                                       self.num_labels())}


class EncodeWords(grain.transforms.Map):
    """A record of words and word labels -> sub-word tokens, the label on each word's first piece."""

    def __init__(self, context: RowContext):
        self.tokenizer, self.seq_len = context.tokenizer, context.data.seq_len
        self.special = context.require_special("cls", "sep", "pad")

    def map(self, record: Record) -> dict[str, np.ndarray]:
        if "words" not in record:
            raise ConfigError("data.objective=token_classification reads records with words and tags: use "
                              "data.source=conll, or jsonl with data.words_field/data.tags_field and data.labels")
        word_ids = [self.tokenizer.encode(word) for word in record["words"]]
        row = masking.align_word_labels(word_ids, record["word_labels"], self.seq_len, cls_id=self.special["cls"],
                                        sep_id=self.special["sep"], pad_id=self.special["pad"])
        row.pop("truncated_words")
        return row


class TokenClassification(_LabelledTask):
    """A label per word (on its first sub-token): softmax per token, or a linear-chain CRF over the words
    with model.crf (forward-algorithm loss, Viterbi decoding); eval/accuracy and eval/f1 (macro) over words."""

    name = "token_classification"

    def heads(self) -> tuple[str, ...]:
        return ("token_classifier",)

    def rows(self, records: grain.MapDataset, context: RowContext) -> grain.IterDataset:
        return records.map(EncodeWords(context)).to_iter_dataset(context.read_options)

    def batch_spec(self) -> dict[str, Field]:
        seq_len = self.config.data.seq_len
        return {"inputs": token_field(seq_len), "segment_ids": token_field(seq_len), "labels": token_field(seq_len),
                "label_weights": token_field(seq_len, np.float32)}

    def model_inputs(self, batch: Batch) -> dict[str, jax.Array | None]:
        return {"tokens_BT": batch["inputs"], "segment_ids_BT": batch["segment_ids"]}

    def loss_weights(self, batch: Batch) -> dict[str, jax.Array]:
        return {"labels": jnp.sum(batch["label_weights"])}

    def _loss_sum(self, outputs: Outputs, batch: Batch) -> jax.Array:
        emissions_BTC, weights_BT = outputs.heads["token_classifier"], batch["label_weights"]
        if "crf" not in outputs.heads:
            return weighted_cross_entropy(emissions_BTC, batch["labels"], weights_BT)[0]
        scores = outputs.heads["crf"]
        emissions_BTC, labels_BT, mask_BT = crf.gather_labeled(emissions_BTC, batch["labels"], weights_BT > 0)
        log_likelihood_B = crf.crf_log_likelihood(emissions_BTC, labels_BT, mask_BT, scores["transitions"],
                                                  scores["start"], scores["end"])
        return -jnp.sum(log_likelihood_B)  # per sequence; divided by the labelled words like the softmax loss

    def loss_terms(self, outputs: Outputs, batch: Batch) -> LossTerms:
        return {"labels": (self._loss_sum(outputs, batch), jnp.sum(batch["label_weights"]))}

    def tokens(self, batch: Batch) -> jax.Array:
        return jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32)

    def predict(self, outputs: Outputs, batch: Batch) -> jax.Array:
        """Labels per token: argmax, or the Viterbi path over the labelled positions with a CRF."""
        emissions_BTC, mask_BT = outputs.heads["token_classifier"], batch["label_weights"] > 0
        if "crf" not in outputs.heads:
            return jnp.argmax(emissions_BTC, -1)
        scores = outputs.heads["crf"]
        compact_BTC, _, compact_mask_BT = crf.gather_labeled(emissions_BTC, batch["labels"], mask_BT)
        path_BT = crf.viterbi_decode(compact_BTC, compact_mask_BT, scores["transitions"], scores["start"],
                                     scores["end"])
        return crf.scatter_labeled(path_BT, mask_BT)

    def eval_sums(self, outputs: Outputs, batch: Batch) -> dict[str, jax.Array]:
        weights_BT = batch["label_weights"]
        return {"loss_sum": self._loss_sum(outputs, batch), "weight_sum": jnp.sum(weights_BT),
                "confusion": confusion(self.predict(outputs, batch), batch["labels"], weights_BT, self.num_labels())}
