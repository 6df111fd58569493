"""Encoder-decoder tasks (model.family=encoder_decoder): T5 span corruption and supervised seq2seq.

Both feed packed (inputs, targets) rows (llm_jax.data.seq2seq_rows: encoder tokens with their own segment ids
and positions, decoder inputs = targets shifted right from the start token, weights on real targets) and
reserve data.num_sentinels ids above the tokenizer's vocabulary for T5's sentinels (<extra_id_0> is the top
one), so a span-corruption checkpoint fine-tunes on seq2seq data with the same embedding.

Seq2seq reads pair records ({"inputs", "targets"} texts: data.source=pairs_jsonl / pairs_tsv, llm_jax.data.pairs)
or labelled records as text-to-text classification (the target is the label's name, data.target_labels; the
input gets data.input_prefix, e.g. "sst2 sentence: "). Its evaluation reports eval/exact_match: the share of
examples whose every target token is the model's argmax given the targets before it, which is exactly the
share that greedy decoding reproduces (the decoder follows the target path until its first wrong argmax);
for text-to-text classification that is the accuracy (also reported as eval/accuracy).
"""

from __future__ import annotations

import grain
import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.data.objectives import Tokenize
from llm_jax.data.seq2seq_rows import seq2seq_rows
from llm_jax.data.span_corruption import span_corruption_lengths, span_corruption_rows, t5_sentinel_ids
from llm_jax.data.sources import Record
from llm_jax.errors import ConfigError
from llm_jax.models.outputs import Outputs
from llm_jax.tasks.base import Batch, Field, RowContext, token_field
from llm_jax.tasks.causal_lm import CausalLM


def exact_match_sums(logits_BTV: jax.Array, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """(examples whose weighted targets are all argmax-correct, examples) of packed rows: one example per
    (row, target segment id) with weight."""
    wrong_BT = (jnp.argmax(logits_BTV, -1) != batch["targets"]) & (batch["weights"] > 0)
    segments_BT = batch["targets_segment_ids"]
    ids_K = jnp.arange(1, segments_BT.shape[1] + 1)
    in_segment_BTK = segments_BT[..., None] == ids_K
    present_BK = jnp.any(in_segment_BTK & (batch["weights"] > 0)[..., None], axis=1)
    wrong_BK = jnp.any(in_segment_BTK & wrong_BT[..., None], axis=1)
    return jnp.sum(present_BK & ~wrong_BK).astype(jnp.float32), jnp.sum(present_BK).astype(jnp.float32)


class EncoderDecoderTask(CausalLM):
    """What span corruption and seq2seq share: the batch spec and model inputs; the LM loss and its metrics
    are causal_lm's over the decoder's targets (the same batch keys: targets, weights), plus exact match."""

    families = ("encoder_decoder",)

    def extra_vocab(self) -> int:
        return self.config.data.num_sentinels

    def validate(self) -> None:
        super().validate()
        if self.config.data.pipeline != "grain":
            raise ConfigError(f"data.objective={self.name!r} builds (inputs, targets) rows: set data.pipeline=grain")

    def targets_len(self) -> int:
        return self.config.data.targets_seq_len or self.config.data.seq_len

    def batch_spec(self) -> dict[str, Field]:
        inputs_len, targets_len = self.config.data.seq_len, self.targets_len()
        spec = {key: token_field(inputs_len) for key in ("inputs", "inputs_segment_ids", "inputs_positions")}
        spec.update({key: token_field(targets_len)
                     for key in ("decoder_inputs", "targets", "targets_segment_ids", "targets_positions")})
        spec["weights"] = token_field(targets_len, np.float32)
        return spec

    def model_inputs(self, batch: Batch) -> dict[str, jax.Array | None]:
        return {"tokens_BS": batch["inputs"], "decoder_tokens_BT": batch["decoder_inputs"],
                "positions_BS": batch["inputs_positions"], "segment_ids_BS": batch["inputs_segment_ids"],
                "decoder_positions_BT": batch["targets_positions"],
                "decoder_segment_ids_BT": batch["targets_segment_ids"]}

    def eval_sums(self, outputs: Outputs, batch: Batch) -> dict[str, jax.Array]:
        exact, examples = exact_match_sums(outputs.heads["lm"], batch)
        return {**super().eval_sums(outputs, batch), "exact_sum": exact, "examples": examples}

    def finalize(self, sums: dict[str, np.ndarray]) -> dict[str, float]:
        return {**super().finalize(sums),
                "eval/exact_match": float(sums["exact_sum"]) / max(float(sums["examples"]), 1.0),
                "eval/examples": float(sums["examples"])}

    def special(self, context: RowContext) -> tuple[int, int]:
        ids = context.require_special("eos")
        return ids["eos"], ids.get("pad", 0)


class SpanCorruption(EncoderDecoderTask):
    """T5's pretraining objective: noise spans of each document chunk replaced by sentinels in the inputs, the
    targets are the sentinels followed by the spans they hide (data.noise_density, data.mean_noise_span_length;
    chunks sized so that the inputs fill data.seq_len)."""

    name = "span_corruption"

    def targets_len(self) -> int:
        data = self.config.data
        return data.targets_seq_len or span_corruption_lengths(data.seq_len, data.noise_density,
                                                               data.mean_noise_span_length)[1]

    def validate(self) -> None:
        super().validate()
        data = self.config.data
        if not 0 < data.noise_density < 1 or data.mean_noise_span_length < 1:
            raise ConfigError(f"data.noise_density={data.noise_density} must lie in (0, 1) and "
                              f"data.mean_noise_span_length={data.mean_noise_span_length} be >= 1")
        needed = span_corruption_lengths(data.seq_len, data.noise_density, data.mean_noise_span_length)[1]
        if data.targets_seq_len and data.targets_seq_len < needed:
            raise ConfigError(f"data.targets_seq_len={data.targets_seq_len} is shorter than the {needed} target "
                              f"tokens a full chunk needs (data.seq_len={data.seq_len}); use 0 (= {needed})")

    def rows(self, records: grain.MapDataset, context: RowContext) -> grain.IterDataset:
        data = context.data
        eos, pad = self.special(context)
        total_vocab = context.tokenizer.vocab_size + data.num_sentinels
        documents = records.map(Tokenize(context.tokenizer)).to_iter_dataset(context.read_options)
        return span_corruption_rows(documents, eos_id=eos, pad_id=pad,
                                    sentinel_ids=t5_sentinel_ids(total_vocab, data.num_sentinels),
                                    inputs_length=data.seq_len, targets_length=self.targets_len(),
                                    noise_density=data.noise_density,
                                    mean_noise_span_length=data.mean_noise_span_length, seed=data.seed,
                                    num_packing_bins=data.packing_bins)


class PairExamples(grain.transforms.Map):
    """A pair or labelled record -> {"inputs", "targets"} token ids, each ending with EOS."""

    def __init__(self, context: RowContext, eos_id: int):
        self.tokenizer, self.eos_id = context.tokenizer, eos_id
        data = context.data
        self.prefix = data.input_prefix
        self.label_texts = tuple(data.target_labels) or tuple(str(label) for label in data.labels)

    def texts(self, record: Record) -> tuple[str, str]:
        if "targets" in record:
            return record["inputs"], record["targets"]
        if "label" in record:
            return record["document"], self.label_texts[int(record["label"])]
        raise ValueError("a seq2seq record needs 'inputs'/'targets' (data.source=pairs_jsonl or pairs_tsv) or a "
                         "'label' (a labelled tsv/jsonl source with data.labels)")

    def map(self, record: Record) -> dict[str, np.ndarray]:
        source, target = self.texts(record)
        return {side: np.append(self.tokenizer.encode(text).astype(np.int32), np.int32(self.eos_id))
                for side, text in (("inputs", self.prefix + source), ("targets", target))}


class Seq2Seq(EncoderDecoderTask):
    """Supervised seq2seq (translation-style pairs, text-to-text classification): teacher-forced LM loss on the
    targets; eval/exact_match (= greedy-decoding exact match) and, for labelled records, eval/accuracy."""

    name = "seq2seq"

    def validate(self) -> None:
        super().validate()
        data = self.config.data
        if data.target_labels and len(data.target_labels) != len(data.labels):
            raise ConfigError(f"data.target_labels has {len(data.target_labels)} names for the {len(data.labels)} "
                              "data.labels: give one target text per label, in the same order")

    def rows(self, records: grain.MapDataset, context: RowContext) -> grain.IterDataset:
        eos, pad = self.special(context)
        examples = records.map(PairExamples(context, eos)).to_iter_dataset(context.read_options)
        return seq2seq_rows(examples, context.data.seq_len, self.targets_len(), decoder_start_id=pad, pad_id=pad,
                            num_packing_bins=context.data.packing_bins, seed=context.data.seed)

    def finalize(self, sums: dict[str, np.ndarray]) -> dict[str, float]:
        metrics = super().finalize(sums)
        if self.config.data.labels:
            metrics["eval/accuracy"] = metrics["eval/exact_match"]
        return metrics
