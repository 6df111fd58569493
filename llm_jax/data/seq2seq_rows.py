"""Encoder-decoder rows: (inputs, targets) examples as fixed-size rows for an encoder-decoder model.

Examples are dicts with int32 token arrays "inputs" and "targets" (already ending with EOS if wanted). Rows
have these keys, each a numpy array:

* `inputs` [Le] int32: encoder tokens, pad_id on padding
* `inputs_segment_ids` [Le] int32: 1, 2, 3, ... per example in the row, 0 on padding
* `inputs_positions` [Le] int32: 0, 1, ... restarting at each example, 0 on padding
* `decoder_inputs` [Ld] int32: the targets shifted right by one within each example, each example's first
  position holding `decoder_start_id` (T5 uses the pad id 0); pad_id on padding
* `targets` [Ld] int32, `targets_segment_ids` [Ld] int32, `targets_positions` [Ld] int32: as on the encoder side
* `weights` [Ld] float32: 1.0 on real target tokens, 0.0 on padding

An example's inputs and targets share one segment id, so cross-attention can mask each decoder token to the
encoder tokens of its own example (query segment == key segment). `pack_seq2seq` places whole examples
first-fit (Grain's FirstFitPackIterDataset, as `data.packing=first_fit` does for decoder rows) into rows where
both sides fit; no example is split across rows. `pad_seq2seq` puts one example per row (evaluation by
generation). Examples longer than Le (inputs) or Ld (targets) are truncated: their first Le / Ld tokens are
kept, so a truncated side loses its EOS; `truncated_sides` counts them for callers that want to report it.
"""

from __future__ import annotations

import grain
import numpy as np

Example = dict[str, np.ndarray]
SIDES = ("inputs", "targets")


def truncated_sides(example: Example, inputs_length: int, targets_length: int) -> int:
    """How many of the example's two sides (0, 1 or 2) are longer than their row length."""
    return int(len(example["inputs"]) > inputs_length) + int(len(example["targets"]) > targets_length)


def truncate_example(example: Example, inputs_length: int, targets_length: int) -> Example:
    """The example's inputs and targets as int32, cut to their first inputs_length / targets_length tokens."""
    return {"inputs": np.asarray(example["inputs"], np.int32).reshape(-1)[:inputs_length],
            "targets": np.asarray(example["targets"], np.int32).reshape(-1)[:targets_length]}


def shift_right_per_segment(targets_T: np.ndarray, segment_ids_T: np.ndarray, start_id: int) -> np.ndarray:
    """Decoder inputs of packed targets: each token's predecessor within its segment, `start_id` at the
    first token of each segment; padding (segment 0) keeps its token."""
    decoder_inputs_T = np.empty_like(targets_T)
    decoder_inputs_T[1:] = targets_T[:-1]
    starts_T = np.ones(len(targets_T), bool)
    starts_T[1:] = segment_ids_T[1:] != segment_ids_T[:-1]
    decoder_inputs_T[starts_T] = start_id
    padding_T = segment_ids_T == 0
    decoder_inputs_T[padding_T] = targets_T[padding_T]
    return decoder_inputs_T


class FinishRow(grain.transforms.Map):
    """A packed {inputs, targets} row (with Grain's *_segment_ids / *_positions) -> the full row of the
    module docstring: decoder_inputs and weights added, padding set to pad_id."""

    def __init__(self, decoder_start_id: int = 0, pad_id: int = 0):
        self.decoder_start_id, self.pad_id = int(decoder_start_id), int(pad_id)

    def map(self, packed: Example) -> Example:
        row = {key: np.asarray(value, np.int32) for key, value in packed.items()}
        for side in SIDES:
            row[side] = np.where(row[f"{side}_segment_ids"] > 0, row[side], self.pad_id).astype(np.int32)
        segments_T = row["targets_segment_ids"]
        row["decoder_inputs"] = shift_right_per_segment(row["targets"], segments_T, self.decoder_start_id)
        row["weights"] = (segments_T > 0).astype(np.float32)
        return row


class _Truncate(grain.transforms.Map):
    def __init__(self, inputs_length: int, targets_length: int):
        self.inputs_length, self.targets_length = inputs_length, targets_length

    def map(self, example: Example) -> Example:
        return truncate_example(example, self.inputs_length, self.targets_length)


def _check_lengths(inputs_length: int, targets_length: int) -> None:
    if inputs_length < 1 or targets_length < 1:
        raise ValueError(f"inputs_length={inputs_length}, targets_length={targets_length}: row lengths must be >= 1")


def _as_iter(examples: grain.IterDataset | grain.MapDataset) -> grain.IterDataset:
    return examples.to_iter_dataset() if isinstance(examples, grain.MapDataset) else examples


def pack_seq2seq(examples: grain.IterDataset | grain.MapDataset, inputs_length: int, targets_length: int, *,
                 decoder_start_id: int = 0, pad_id: int = 0, num_packing_bins: int = 16, seed: int = 0,
                 shuffle_bins: bool = True) -> grain.IterDataset:
    """Examples {inputs, targets} -> packed rows (module docstring), whole examples first-fit into
    `num_packing_bins` open rows where both sides fit; too-long sides are truncated first. The iterator
    checkpoints with the pipeline (get_state / set_state)."""
    _check_lengths(inputs_length, targets_length)
    truncated = _as_iter(examples).map(_Truncate(inputs_length, targets_length))
    packed = grain.experimental.FirstFitPackIterDataset(
        truncated, length_struct={"inputs": inputs_length, "targets": targets_length},
        num_packing_bins=num_packing_bins, seed=seed, shuffle_bins=shuffle_bins)
    return packed.map(FinishRow(decoder_start_id, pad_id))


def pad_example(example: Example, inputs_length: int, targets_length: int, *, decoder_start_id: int = 0,
                pad_id: int = 0) -> Example:
    """One example as one padded row (module docstring), segment id 1, too-long sides truncated."""
    example = truncate_example(example, inputs_length, targets_length)
    packed = {}
    for side, length in zip(SIDES, (inputs_length, targets_length)):
        tokens = example[side]
        packed[side] = np.zeros(length, np.int32)
        packed[side][:len(tokens)] = tokens
        packed[f"{side}_segment_ids"] = (np.arange(length) < len(tokens)).astype(np.int32)
        packed[f"{side}_positions"] = np.where(np.arange(length) < len(tokens), np.arange(length), 0)
    return FinishRow(decoder_start_id, pad_id).map(packed)


class _PadExample(grain.transforms.Map):
    def __init__(self, inputs_length: int, targets_length: int, decoder_start_id: int, pad_id: int):
        self.lengths, self.ids = (inputs_length, targets_length), (decoder_start_id, pad_id)

    def map(self, example: Example) -> Example:
        return pad_example(example, *self.lengths, decoder_start_id=self.ids[0], pad_id=self.ids[1])


def pad_seq2seq(examples: grain.IterDataset | grain.MapDataset, inputs_length: int, targets_length: int, *,
                decoder_start_id: int = 0, pad_id: int = 0) -> grain.IterDataset:
    """Examples {inputs, targets} -> one padded row each, in order (evaluation by generation)."""
    _check_lengths(inputs_length, targets_length)
    return _as_iter(examples).map(_PadExample(inputs_length, targets_length, decoder_start_id, pad_id))


def seq2seq_rows(examples: grain.IterDataset | grain.MapDataset, inputs_length: int, targets_length: int, *,
                 packed: bool = True, decoder_start_id: int = 0, pad_id: int = 0, num_packing_bins: int = 16,
                 seed: int = 0) -> grain.IterDataset:
    """The entry point for plain (inputs, targets) pairs: `pack_seq2seq` when packed, else `pad_seq2seq`."""
    if packed:
        return pack_seq2seq(examples, inputs_length, targets_length, decoder_start_id=decoder_start_id,
                            pad_id=pad_id, num_packing_bins=num_packing_bins, seed=seed)
    return pad_seq2seq(examples, inputs_length, targets_length, decoder_start_id=decoder_start_id, pad_id=pad_id)
