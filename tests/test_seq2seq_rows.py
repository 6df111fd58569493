"""Encoder-decoder rows (llm_jax.data.seq2seq_rows): every example intact in one row under one segment id on
both sides, positions restarting, decoder inputs shifted per segment, weights on target tokens only, truncation,
the unpacked evaluation rows, resume, and the fill rate of packing."""

from __future__ import annotations

from collections import Counter
from typing import Callable

import grain
import numpy as np
import pytest

from llm_jax.data import seq2seq_rows

VOCAB = 50


def _examples(seed: int, count: int, max_inputs: int, max_targets: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"inputs": rng.integers(1, VOCAB, int(rng.integers(1, max_inputs + 1))).astype(np.int32),
             "targets": rng.integers(1, VOCAB, int(rng.integers(1, max_targets + 1))).astype(np.int32)}
            for _ in range(count)]


def _key(inputs: np.ndarray, targets: np.ndarray) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return tuple(int(i) for i in inputs), tuple(int(t) for t in targets)


def segments_of(row: dict[str, np.ndarray]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The (inputs, targets) examples of a row, by segment id; checks each segment's layout on the way."""
    found = []
    for segment in range(1, int(row["inputs_segment_ids"].max(initial=0)) + 1):
        sides = {}
        for side in ("inputs", "targets"):
            where = np.flatnonzero(row[f"{side}_segment_ids"] == segment)
            assert len(where) and np.all(np.diff(where) == 1), f"segment {segment} of {side} is not one run"
            np.testing.assert_array_equal(row[f"{side}_positions"][where], np.arange(len(where)))
            sides[side] = row[side][where]
        where = np.flatnonzero(row["targets_segment_ids"] == segment)
        np.testing.assert_array_equal(row["decoder_inputs"][where[1:]], row["targets"][where[:-1]])
        found.append(_key(sides["inputs"], sides["targets"]))
    return found


def check_row(row: dict[str, np.ndarray], inputs_length: int, targets_length: int, *, start_id: int,
               pad_id: int) -> None:
    assert {key: value.shape for key, value in row.items()} == {
        "inputs": (inputs_length,), "inputs_segment_ids": (inputs_length,), "inputs_positions": (inputs_length,),
        "targets": (targets_length,), "targets_segment_ids": (targets_length,),
        "targets_positions": (targets_length,), "decoder_inputs": (targets_length,), "weights": (targets_length,)}
    assert row["weights"].dtype == np.float32 and row["inputs"].dtype == np.int32
    assert set(np.unique(row["inputs_segment_ids"])) - {0} == set(np.unique(row["targets_segment_ids"])) - {0}
    targets_segments = row["targets_segment_ids"]
    np.testing.assert_array_equal(row["weights"], (targets_segments > 0).astype(np.float32))
    first = (targets_segments > 0) & np.concatenate([[True], targets_segments[1:] != targets_segments[:-1]])
    assert np.all(row["decoder_inputs"][first] == start_id)
    for side in ("inputs", "targets"):
        padding = row[f"{side}_segment_ids"] == 0
        assert np.all(row[side][padding] == pad_id) and np.all(row[f"{side}_positions"][padding] == 0)
        assert not padding.any() or padding[np.argmax(padding):].all(), f"{side}: padding is not a suffix"


def _pack(examples, inputs_length, targets_length, **kwargs) -> list[dict[str, np.ndarray]]:
    return list(seq2seq_rows.pack_seq2seq(grain.MapDataset.source(examples), inputs_length, targets_length, **kwargs))


@pytest.mark.parametrize("lengths", [(32, 8), (64, 64), (20, 40)])
def test_packed_rows_hold_every_example_intact_under_one_segment_id(lengths):
    inputs_length, targets_length = lengths
    examples = _examples(0, 150, inputs_length // 2, targets_length // 2) + _examples(1, 5, inputs_length,
                                                                                       targets_length)
    rows = _pack(examples, inputs_length, targets_length, decoder_start_id=0, pad_id=0)
    found = Counter()
    for row in rows:
        check_row(row, inputs_length, targets_length, start_id=0, pad_id=0)
        found.update(segments_of(row))
    assert found == Counter(_key(e["inputs"], e["targets"]) for e in examples)  # none lost, none split
    assert len(rows) < len(examples) / 2, "packing should put several short examples in a row"


def test_start_and_pad_ids_are_parameters():
    examples = _examples(1, 40, 10, 10)
    rows = _pack(examples, 24, 24, decoder_start_id=7, pad_id=3)
    for row in rows:
        check_row(row, 24, 24, start_id=7, pad_id=3)
    assert any((row["inputs_segment_ids"] == 0).any() for row in rows), "the test needs some padding"


def test_shift_right_per_segment_on_a_hand_made_row():
    targets = np.array([5, 6, 7, 8, 9, 4, 0, 0], np.int32)
    segments = np.array([1, 1, 1, 2, 2, 3, 0, 0], np.int32)
    np.testing.assert_array_equal(seq2seq_rows.shift_right_per_segment(targets, segments, 0),
                                  [0, 5, 6, 0, 8, 0, 0, 0])


def test_too_long_examples_are_truncated_and_counted():
    long_example = {"inputs": np.arange(1, 31, dtype=np.int32), "targets": np.arange(1, 13, dtype=np.int32)}
    assert seq2seq_rows.truncated_sides(long_example, 20, 12) == 1
    assert seq2seq_rows.truncated_sides(long_example, 20, 10) == 2
    rows = _pack([long_example] + _examples(2, 10, 5, 5), 20, 10)
    found = Counter(key for row in rows for key in segments_of(row))
    assert found[_key(np.arange(1, 21), np.arange(1, 11))] == 1


def test_unpacked_rows_are_one_example_each_in_order():
    examples = _examples(3, 12, 16, 8) + [{"inputs": np.arange(1, 40, dtype=np.int32),
                                           "targets": np.arange(1, 3, dtype=np.int32)}]
    rows = list(seq2seq_rows.seq2seq_rows(grain.MapDataset.source(examples), 16, 8, packed=False,
                                          decoder_start_id=0, pad_id=0))
    assert len(rows) == len(examples)
    for row, example in zip(rows, examples):
        check_row(row, 16, 8, start_id=0, pad_id=0)
        assert set(np.unique(row["inputs_segment_ids"])) <= {0, 1}
        assert segments_of(row) == [_key(example["inputs"][:16], example["targets"][:8])]


def assert_resumes(make_rows: Callable[[], grain.IterDataset], skip: int) -> None:
    """A fresh iterator restored from the state after `skip` rows yields exactly the rest of the rows."""
    everything = list(make_rows())
    iterator = iter(make_rows())
    for _ in range(skip):
        next(iterator)
    resumed = iter(make_rows())
    resumed.set_state(iterator.get_state())
    rest = list(resumed)
    assert len(rest) == len(everything) - skip
    for want, got in zip(everything[skip:], rest):
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_packing_resumes_from_a_checkpointed_iterator():
    examples = _examples(4, 80, 30, 12)
    assert_resumes(lambda: seq2seq_rows.pack_seq2seq(grain.MapDataset.source(examples), 32, 16, seed=5), 5)


def test_bad_row_lengths_are_refused():
    with pytest.raises(ValueError, match="row lengths"):
        seq2seq_rows.pack_seq2seq(grain.MapDataset.source(_examples(5, 2, 3, 3)), 0, 4)


def fill_rates(rows: list[dict[str, np.ndarray]]) -> tuple[float, float]:
    """Share of real tokens on the encoder and on the decoder side."""
    return (float(np.mean([row["inputs_segment_ids"] > 0 for row in rows])),
            float(np.mean([row["targets_segment_ids"] > 0 for row in rows])))


def test_fill_rate_of_packed_translation_like_pairs():
    """Pairs whose target length follows the input length (as in translation), lengths of wikitext2-like
    sentences; 16 open rows keep padding small on both sides."""
    rng = np.random.default_rng(6)
    lengths = np.clip(rng.lognormal(np.log(30), 0.7, 3000), 1, 128).astype(int)
    examples = [{"inputs": np.ones(n, np.int32), "targets": np.ones(max(1, int(n * rng.uniform(0.8, 1.2))), np.int32)}
                for n in lengths]
    inputs_fill, targets_fill = fill_rates(_pack(examples, 128, 128))
    print(f"packed pairs, Le=Ld=128: fill inputs {inputs_fill:.3f}, targets {targets_fill:.3f}")
    assert min(inputs_fill, targets_fill) > 0.85
