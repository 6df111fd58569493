"""T5 span corruption (llm_jax.data.span_corruption): exact reconstruction, T5's counts and sentinel order,
T5's chunk-length numbers, determinism and resume, and the packed rows of the Grain entry point."""

from __future__ import annotations

from collections import Counter

import grain
import numpy as np
import pytest

from llm_jax.data import span_corruption as sc
from test_seq2seq_rows import check_row, assert_resumes, fill_rates, segments_of

VOCAB = 2000
EOS, PAD = 1, 0
SENTINELS = sc.t5_sentinel_ids(VOCAB, 500)


def _document(rng: np.random.Generator, length: int) -> np.ndarray:
    return rng.integers(2, VOCAB - 500, length).astype(np.int32)  # no EOS, pad or sentinel inside


def _corrupt(tokens, seed=0, density=0.15, span=3.0):
    return sc.span_corruption(tokens, np.random.default_rng(seed), sentinel_ids=SENTINELS, eos_id=EOS,
                              noise_density=density, mean_noise_span_length=span)


def _sentinels_in(ids: np.ndarray) -> list[int]:
    return [int(i) for i in ids if int(i) in set(SENTINELS)]


def test_t5_sentinel_ids_count_down_from_the_top_of_the_vocabulary():
    assert sc.t5_sentinel_ids(32128, 3) == [32127, 32126, 32125]
    with pytest.raises(ValueError, match="count"):
        sc.t5_sentinel_ids(10, 10)


def test_inputs_and_targets_reconstruct_the_document_exactly():
    rng = np.random.default_rng(0)
    lengths = list(range(0, 12)) + [int(n) for n in rng.integers(12, 501, 150)]
    for index, length in enumerate(lengths):
        density, span = float(rng.uniform(0.05, 0.5)), float(rng.uniform(1.0, 5.0))
        tokens = _document(rng, length)
        inputs, targets = _corrupt(tokens, index, density, span)
        rebuilt = sc.fill_sentinels(inputs, targets, sentinel_ids=SENTINELS, eos_id=EOS)
        np.testing.assert_array_equal(rebuilt, tokens, err_msg=f"length {length}, density {density}, span {span}")


@pytest.mark.parametrize("density,span", [(0.15, 3.0), (0.05, 1.0), (0.5, 5.0), (0.3, 2.0)])
def test_noise_share_span_count_sentinel_order_and_eos_follow_t5(density, span):
    rng = np.random.default_rng(1)
    for length in [2, 3, 7, 50, 100, 333, 500]:
        inputs, targets = _corrupt(_document(rng, length), length, density, span)
        noise = min(max(round(length * density), 1), length - 1)  # Python's round halves to even, as tf.round
        spans = min(max(round(noise / span), 1), noise, length - noise)
        assert sc.noise_span_counts(length, density, span) == (noise, spans)
        assert _sentinels_in(inputs) == _sentinels_in(targets) == SENTINELS[:spans]
        assert len(targets) == noise + spans + 1 and len(inputs) == length - noise + spans + 1
        assert inputs[-1] == targets[-1] == EOS
        assert inputs[0] not in SENTINELS, "T5 starts with a kept span"
        assert targets[0] == SENTINELS[0]


def test_known_counts_and_mean_span_length():
    assert sc.noise_span_counts(100) == (15, 5)
    assert sc.noise_span_counts(568) == (85, 28)
    rng = np.random.default_rng(2)
    span_lengths = []
    for seed in range(200):
        targets = _corrupt(_document(rng, 200), seed, 0.15, 3.0)[1][:-1]
        starts = [i for i, token in enumerate(targets) if token in SENTINELS] + [len(targets)]
        span_lengths += [b - a - 1 for a, b in zip(starts[:-1], starts[1:])]
    assert min(span_lengths) >= 1 and abs(np.mean(span_lengths) - 3.0) < 0.01  # 30 noise tokens in 10 spans


def test_random_segmentation_gives_non_empty_parts_that_add_up():
    rng = np.random.default_rng(3)
    for items, segments in [(1, 1), (5, 5), (30, 7), (100, 1)]:
        lengths = sc.random_segmentation(items, segments, rng)
        assert len(lengths) == segments and lengths.sum() == items and lengths.min() >= 1
    with pytest.raises(ValueError, match="non-empty"):
        sc.random_segmentation(3, 4, rng)


def test_tiny_documents():
    assert [list(x) for x in _corrupt(np.zeros(0, np.int32))] == [[EOS], [EOS]]
    inputs, targets = _corrupt(np.array([42], np.int32))  # T5: the mask of 2 tokens, cut to 1: no noise
    assert list(inputs) == [42, EOS] and list(targets) == [SENTINELS[0], EOS]


def test_t5_chunk_length_for_512_inputs():
    assert sc.span_corruption_lengths(512, 0.15, 3.0) == (568, 114)


@pytest.mark.parametrize("density,span", [(0.15, 3.0), (0.05, 1.0), (0.3, 2.5), (0.5, 3.0)])
def test_full_chunks_give_exactly_inputs_length_tokens(density, span):
    rng = np.random.default_rng(4)
    for inputs_length in [3, 8, 64, 128, 512, 626, 1024]:
        chunk_length, targets_length = sc.span_corruption_lengths(inputs_length, density, span)
        inputs, targets = _corrupt(_document(rng, chunk_length), inputs_length, density, span)
        assert len(targets) == targets_length
        # T5 drops one more token at density 0.5 when the targets would outgrow the inputs
        assert len(inputs) == inputs_length or (density == 0.5 and len(inputs) == inputs_length - 1)
        longer = _corrupt(_document(rng, chunk_length + 1), inputs_length, density, span)[0]
        assert len(longer) > inputs_length or density == 0.5, "the chunk length is not the longest that fits"


def test_corruption_is_deterministic_per_seed_and_chunk_index():
    chunk = _document(np.random.default_rng(5), 300)
    corrupt = sc.CorruptChunk(sentinel_ids=SENTINELS, eos_id=EOS, noise_density=0.15, mean_noise_span_length=3.0,
                              seed=7)
    other_seed = sc.CorruptChunk(sentinel_ids=SENTINELS, eos_id=EOS, noise_density=0.15,
                                 mean_noise_span_length=3.0, seed=8)
    first = corrupt(12, chunk)
    for _ in range(3):
        corrupt(int(np.random.default_rng().integers(100)), chunk)  # what came before does not matter
    again = corrupt(12, chunk)
    assert all(np.array_equal(first[key], again[key]) for key in first)
    assert not np.array_equal(first["inputs"], other_seed(12, chunk)["inputs"])
    assert not np.array_equal(first["inputs"], corrupt(13, chunk)["inputs"])


def _documents(seed: int, count: int, mean_length: float) -> list[np.ndarray]:
    """Wikitext2-like documents: log-normal lengths around mean_length tokens, a few long ones."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(mean_length), 1.0, count), 1, 4000).astype(int)
    return [np.append(_document(rng, n), np.int32(EOS)) for n in lengths]  # ending with EOS, as Tokenize writes


def _rows(docs, inputs_length=64, seed=0, **kwargs):
    source = grain.MapDataset.source([{"tokens": doc} for doc in docs])
    return sc.span_corruption_rows(source, eos_id=EOS, pad_id=PAD, sentinel_ids=SENTINELS,
                                   inputs_length=inputs_length, seed=seed, **kwargs)


@pytest.mark.parametrize("packed", [True, False])
def test_rows_hold_every_chunk_of_every_document(packed):
    docs = _documents(6, 40, 60)
    chunk_length, targets_length = sc.span_corruption_lengths(64)
    rows = list(_rows(docs, 64, packed=packed))
    rebuilt = Counter()
    for row in rows:
        check_row(row, 64, targets_length, start_id=PAD, pad_id=PAD)
        for inputs, targets in segments_of(row):
            rebuilt[tuple(sc.fill_sentinels(inputs, targets, sentinel_ids=SENTINELS, eos_id=EOS))] += 1
    chunks = Counter(tuple(int(t) for t in doc[i:i + chunk_length])
                     for doc in (d[:-1] for d in docs) for i in range(0, len(doc), chunk_length))
    assert rebuilt == chunks
    assert packed or len(rows) == sum(chunks.values())


def test_rows_are_deterministic_differ_across_seeds_and_resume():
    docs = _documents(7, 30, 80)
    everything, again, other_seed = (list(_rows(docs, seed=seed)) for seed in (1, 1, 2))
    assert len(again) == len(everything)
    for want, got in zip(everything, again):
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    assert not all(np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(everything, other_seed))
    assert_resumes(lambda: _rows(docs, seed=1), 6)


def test_settings_that_cannot_work_are_refused():
    docs = _documents(8, 2, 10)
    with pytest.raises(ValueError, match="at least 114"):
        _rows(docs, 512, targets_length=100)
    with pytest.raises(ValueError, match="sentinel"):
        sc.span_corruption_rows(grain.MapDataset.source(docs), eos_id=EOS, pad_id=PAD, sentinel_ids=SENTINELS[:5],
                                inputs_length=512)
    with pytest.raises(ValueError, match="noise_density"):
        sc.noise_span_counts(10, 1.5)


def test_fill_rate_of_span_corruption_rows():
    """Wikitext2-like documents (about 150 tokens on average) at T5's Le=512 / Ld=114."""
    inputs_fill, targets_fill = fill_rates(list(_rows(_documents(9, 600, 150), 512)))
    print(f"span corruption, Le=512, Ld=114: fill inputs {inputs_fill:.3f}, targets {targets_fill:.3f}")
    assert inputs_fill > 0.85 and targets_fill > 0.8
