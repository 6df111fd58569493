"""Supervised fine-tuning (SFT) of a decoder-only LM on prompt -> response pairs, the loss on the responses only.

Each pair (`llm_jax.data.pairs`: {"inputs": prompt, "targets": response}) becomes the tokens of
`data.sft_template.format(prompt=...)`, then of the response, then EOS, tokenized separately and concatenated.
A pair longer than data.seq_len + 1 tokens is truncated, never dropped: the prompt loses tokens from the left
first (down to its last token, so the response's first token is still predicted), then the response from the
right (losing its EOS). Pairs are packed into rows by data.packing (first_fit keeps every pair whole in one row;
concat_split continues a pair in the next row as a new segment) with segment ids and positions per pair, always
(data.separate_documents does not apply): no attention and no target crosses pairs.

The batch is causal_lm's (inputs, targets, weights, segment_ids, positions), with weight 1 exactly on the targets
that are response tokens (the response and its EOS) of the input's own pair; eval/loss, eval/perplexity and
eval/token_accuracy are over those tokens. With model.attention_mask=prefix_lm the batch adds "prefix", 1 on
the inputs that are prompt tokens (0 on responses and padding), which the model reads bidirectionally. To carry
the loss mask through the generic packers, which pack one token array, a pair's tokens travel packed as codes
2 * id + (1 on response tokens), unpacked after packing.
"""

from __future__ import annotations

import logging

import grain
import jax
import numpy as np

from llm_jax.errors import ConfigError
from llm_jax.data.objectives import NextTokenRows
from llm_jax.data.packing import PACKINGS
from llm_jax.data.pairs import INPUTS, PAIR_SOURCES, TARGETS
from llm_jax.data.sources import Record
from llm_jax.models.attention_masks import ATTENTION_MASKS
from llm_jax.tasks.base import Batch, Field, RowContext, token_field
from llm_jax.tasks.causal_lm import CausalLM

logger = logging.getLogger(__name__)


def truncate_pair(prompt: np.ndarray, response: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """(prompt, response) cut to at most `length` tokens together: the prompt from the left first, keeping its
    last token when it has one, then the response from the right."""
    if len(prompt) + len(response) <= length:
        return prompt, response
    keep = max(length - len(response), min(len(prompt), 1))
    prompt = prompt[len(prompt) - keep:]
    return prompt, response[:length - len(prompt)]


def eos_id(context: RowContext) -> int:
    """The tokenizer's EOS id, which ends every response; a ConfigError saying which tokenizers have one."""
    special = context.special_ids
    if "eos" not in special:
        raise ConfigError(f"data.objective='sft' ends every response with an EOS token (so the model learns where to "
                          f"stop), and the {context.tokenizer.kind!r} tokenizer has none: use "
                          "data.tokenizer=sentencepiece (trained on the pairs, or a pretraining run's model via "
                          "data.tokenizer_path=DIR/tokenizer/spm.model) or data.tokenizer=gpt2_bpe")
    return special["eos"]


class EncodePair(grain.transforms.Map):
    """A pair record -> {"tokens": codes of template(prompt) + response + EOS, at most data.seq_len + 1}, each
    code 2 * id + 1 on response tokens (incl. EOS) and 2 * id on prompt tokens."""

    def __init__(self, context: RowContext):
        self.tokenizer, self.template = context.tokenizer, context.data.sft_template
        self.length, self.eos_id = context.data.seq_len + 1, eos_id(context)
        self.truncated = 0

    def map(self, record: Record) -> dict[str, np.ndarray]:
        prompt = self.tokenizer.encode(self.template.format(prompt=record[INPUTS])).astype(np.int32)
        response = np.append(self.tokenizer.encode(record[TARGETS]), self.eos_id).astype(np.int32)
        if len(prompt) + len(response) > self.length:
            self.truncated += 1
            if self.truncated == 1:
                logger.warning("a pair of %d + %d tokens is longer than data.seq_len + 1 = %d: truncated (prompt "
                               "from the left first); raise data.seq_len to keep long pairs whole",
                               len(prompt), len(response), self.length)
            prompt, response = truncate_pair(prompt, response, self.length)
        is_response = np.concatenate([np.zeros(len(prompt), np.int32), np.ones(len(response), np.int32)])
        return {"tokens": np.concatenate([prompt, response]) * 2 + is_response}


class PairRows:
    """A packed row of pair codes -> causal_lm's rows (segments and positions per pair), weight 1 only on
    targets that are response tokens of the input's pair; with `prefix`, "prefix" = 1 on inputs that are prompt
    tokens (padding, code 0 in segment 0, is none)."""

    next_token = NextTokenRows(separate_documents=True)

    def __init__(self, prefix: bool = False):
        self.prefix = prefix

    def __call__(self, row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        codes = row["tokens"]
        example = self.next_token({**row, "tokens": codes >> 1})
        example["weights"] = example["weights"] * (codes[1:] & 1).astype(np.float32)
        if self.prefix:
            example["prefix"] = (((codes[:-1] & 1) == 0) & (example["segment_ids"] > 0)).astype(np.int32)
        return example


def check_template(template: str) -> None:
    """data.sft_template formats with a prompt (a ConfigError naming the key and the fix otherwise)."""
    try:
        ok = "{prompt}" in template and isinstance(template.format(prompt=""), str)
    except (KeyError, IndexError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"data.sft_template={template!r}: give a str.format template with one {{prompt}} and "
                          "no other fields (write literal braces as {{ and }}), e.g. 'Question: {prompt}\\nAnswer:'")


class SupervisedFineTuning(CausalLM):
    """causal_lm on packed prompt/response pairs with the loss on the response tokens (see the module)."""

    name = "sft"
    marks_prefix = True

    def _packed_segments(self) -> bool:
        return True

    def validate(self) -> None:
        super().validate()
        data = self.config.data
        if data.pipeline != "grain":
            raise ConfigError(f"data.objective='sft' packs pairs with the grain pipeline: set data.pipeline=grain "
                              f"(not {data.pipeline!r})")
        sources = [data.source] + [component.get("source", data.source) for component in data.mixture]
        for source in sources:
            if source not in PAIR_SOURCES:
                raise ConfigError(f"data.objective='sft' trains on prompt/response pairs, and data.source={source!r} "
                                  f"gives plain documents: use one of {list(PAIR_SOURCES)}")
        check_template(data.sft_template)

    def rows(self, records: grain.MapDataset, context: RowContext) -> grain.IterDataset:
        data = context.data
        pairs = records.map(EncodePair(context)).to_iter_dataset(context.read_options)
        return PACKINGS.get(data.packing)(pairs, data.seq_len + 1, data).map(PairRows(self._uses_prefix()))

    def _uses_prefix(self) -> bool:
        return ATTENTION_MASKS.get(self.config.model.attention_mask).uses_prefix

    def batch_spec(self) -> dict[str, Field]:
        spec = super().batch_spec()
        if self._uses_prefix():
            spec["prefix"] = token_field(self.config.data.seq_len)
        return spec

    def model_inputs(self, batch: Batch) -> dict[str, jax.Array | None]:
        inputs = super().model_inputs(batch)
        if self._uses_prefix():
            inputs["prefix_BT"] = batch["prefix"]
        return inputs
