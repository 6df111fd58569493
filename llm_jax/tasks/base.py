"""The task interface: what a training task owns, so the steps, accumulation, chunks, checkpoints and the
host loop stay generic.

A task (registered in `llm_jax.tasks.TASKS`, chosen by `data.objective`) turns a split's records into rows
(its data objective), declares the batch it feeds (`batch_spec`: key -> shape, dtype, logical axes, which
init, --compile_only, batch sharding and the pipeline all read), says how a batch becomes model inputs, and
computes its loss terms and evaluation metrics. Losses are returned as (sum, weight) per term, so the
train step divides by weights of the whole batch and gradient accumulation stays exact.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from llm_jax.errors import ConfigError
from llm_jax.data.sources import Record
from llm_jax.data.tokenizers import Tokenizer, special_ids
from llm_jax.models.outputs import Outputs

Batch = dict[str, Any]  # key -> [batch, ...] array: numpy on the host, jax.Array on the devices
LossTerms = dict[str, tuple[jax.Array, jax.Array]]  # term -> (loss sum, weight sum)


@dataclasses.dataclass(frozen=True)
class Field:
    """One batch key without the leading batch dimension: shape, dtype and logical axes (e.g. ("seq",))."""

    shape: tuple[int, ...]
    dtype: Any
    axes: tuple[str | None, ...]


@dataclasses.dataclass(frozen=True)
class RowContext:
    """What a task's data objective reads besides the records."""

    tokenizer: Tokenizer
    data: ml_collections.ConfigDict
    read_options: grain.ReadOptions
    training: bool  # train rows may be shuffled/masked afresh; evaluation rows are one ordered pass

    @property
    def special_ids(self) -> dict[str, int]:
        return special_ids(self.tokenizer)

    def require_special(self, *names: str) -> dict[str, int]:
        ids = self.special_ids
        missing = [name for name in names if name not in ids]
        if missing:
            raise ConfigError(f"data.objective={self.data.objective!r} needs the special tokens {missing}, which the "
                              f"{self.tokenizer.kind} tokenizer lacks: use data.tokenizer=sentencepiece (trained here) "
                              "or wordpiece")
        return ids


def token_field(seq_len: int, dtype: Any = np.int32) -> Field:
    return Field((seq_len,), dtype, ("seq",))


class Task:
    """Base class: subclasses set `name` and `families` and implement the methods that raise here."""

    name = ""
    families: tuple[str, ...] = ()
    vocab_terms: tuple[str, ...] = ()  # loss terms that are a softmax over the vocabulary (optimizer.z_loss)
    marks_prefix = False  # its rows mark a prefix (prefix_BT) for model.attention_mask=prefix_lm

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config

    # ---- the model and the data it needs
    def heads(self) -> tuple[str, ...]:
        raise NotImplementedError

    def num_labels(self) -> int | None:
        return None

    def extra_vocab(self) -> int:
        """Ids the model reserves above the tokenizer's vocabulary (T5's sentinels); 0 for most tasks."""
        return 0

    def validate(self) -> None:
        """Config checks before anything is built; the default checks the family and the attention mask."""
        family = self.config.model.family
        if family not in self.families:
            raise ConfigError(f"data.objective={self.name!r} runs on model.family in {list(self.families)}, not "
                              f"{family!r}")
        self._check_prefix()
        z_loss = self.config.optimizer.z_loss
        if z_loss and not self.vocab_terms:
            raise ConfigError(f"optimizer.z_loss={z_loss} regularises a softmax over the vocabulary, and "
                              f"data.objective={self.name!r} has none (its heads predict a few labels); set "
                              "optimizer.z_loss=0")

    def _check_prefix(self) -> None:
        """A mask that reads a prefix needs a task whose rows mark one (`marks_prefix`)."""
        from llm_jax.models.attention_masks import ATTENTION_MASKS

        mask = self.config.model.attention_mask
        if ATTENTION_MASKS.get(mask).uses_prefix and not self.marks_prefix:
            raise ConfigError(f"model.attention_mask={mask!r} reads each row's prefix, and data.objective="
                              f"{self.name!r} has no prefix to mark: use data.objective=sft (the prompts are the "
                              "prefixes) or model.attention_mask=causal")

    def rows(self, records: grain.MapDataset, context: RowContext) -> grain.IterDataset:
        """The records of one split (already sharded, and for training shuffled and repeated) -> rows of the
        batch spec's keys, each [*field.shape]."""
        raise NotImplementedError

    def batch_spec(self) -> dict[str, Field]:
        raise NotImplementedError

    def model_inputs(self, batch: Batch) -> dict[str, jax.Array | None]:
        """Keyword arguments of the family's __call__ (tokens_BT, positions_BT, segment_ids_BT, token_types_BT)."""
        raise NotImplementedError

    # ---- loss and metrics
    def loss_weights(self, batch: Batch) -> dict[str, jax.Array]:
        """Each loss term's weight over the whole batch (before micro-batching)."""
        raise NotImplementedError

    def loss_terms(self, outputs: Outputs, batch: Batch) -> LossTerms:
        raise NotImplementedError

    def vocab_logits(self, outputs: Outputs, batch: Batch) -> dict[str, tuple[jax.Array, jax.Array]]:
        """term -> (logits [..., V], weights [...]) of each of `vocab_terms`: what z-loss regularises."""
        return {}

    def z_loss_terms(self, outputs: Outputs, batch: Batch) -> LossTerms:
        """term -> (optimizer.z_loss * sum of weight * logsumexp(logits)^2, weight sum) for every vocabulary
        softmax (PaLM's z-loss: keeps the normaliser near 1, so large-vocabulary logits do not drift); the train
        step divides each by its term's weight total, as the term itself. Empty when optimizer.z_loss is 0."""
        coefficient = self.config.optimizer.z_loss
        if not coefficient:
            return {}
        terms = {}
        for name, (logits_XV, weights_X) in self.vocab_logits(outputs, batch).items():
            lse_X = jax.nn.logsumexp(logits_XV.astype(jnp.float32), axis=-1)
            terms[name] = (coefficient * jnp.sum(weights_X * jnp.square(lse_X)), jnp.sum(weights_X))
        return terms

    def tokens(self, batch: Batch) -> jax.Array:
        """Tokens this batch trains on, for train/tokens_per_second."""
        raise NotImplementedError

    def eval_sums(self, outputs: Outputs, batch: Batch) -> dict[str, jax.Array]:
        """Sums over one batch that `finalize` turns into eval/* metrics (summed again over batches)."""
        raise NotImplementedError

    def finalize(self, sums: dict[str, np.ndarray]) -> dict[str, float]:
        raise NotImplementedError

    def report(self, sums: dict[str, np.ndarray]) -> str:
        """A human-readable evaluation report (evaluate prints it); empty when the metrics say it all."""
        return ""


def example_batch(spec: dict[str, Field], batch_size: int = 1) -> dict[str, jax.ShapeDtypeStruct]:
    """Abstract arrays of a batch of the spec (what init and eval_shape trace with)."""
    return {key: jax.ShapeDtypeStruct((batch_size,) + field.shape, field.dtype) for key, field in spec.items()}


def zeros_batch(spec: dict[str, Field], batch_size: int = 1) -> dict[str, jax.Array]:
    return {key: jnp.zeros((batch_size,) + field.shape, field.dtype) for key, field in spec.items()}


def cross_entropy_terms(logits_BTV: jax.Array, targets_BT: jax.Array, weights_BT: jax.Array
                        ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(weighted loss sum, weight sum, weighted correct count) of token predictions."""
    import optax

    losses_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT)
    correct_BT = (jnp.argmax(logits_BTV, -1) == targets_BT).astype(jnp.float32)
    return jnp.sum(losses_BT * weights_BT), jnp.sum(weights_BT), jnp.sum(correct_BT * weights_BT)


class AddDocument(grain.transforms.Map):
    """record -> record with "document" = text_of(record) (a pair's two texts on two lines), so tasks read
    every source (local files, TFDS catalog, mixtures) the same way; "text", "label", ... stay as they are."""

    def __init__(self, text_of: Callable[[Record], str]):
        self.text_of = text_of

    def map(self, record: Record) -> Record:
        return {**record, "document": self.text_of(record)}
