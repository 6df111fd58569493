"""BERT example building (llm_jax.data.masking): masking statistics, pairs, NSP/SOP, word labels."""

from __future__ import annotations

import numpy as np
import pytest

from llm_jax.data import masking

PAD, CLS, SEP, MASK, UNK = 0, 5, 6, 4, 1
SPECIAL = (PAD, UNK, 2, 3, MASK, CLS, SEP)
VOCAB = 200


def _row(rng, length=128, real=120):
    """[CLS] random non-special tokens [SEP] then padding."""
    body = rng.integers(10, VOCAB, real - 2)
    row = np.full(length, PAD, np.int32)
    row[:real] = np.concatenate([[CLS], body, [SEP]])
    return row


def _mask(row, rng, **kwargs):
    return masking.mask_tokens(row, rng, vocab_size=VOCAB, mask_id=MASK, special_ids=SPECIAL, **kwargs)


# ----------------------------------------------------------------------------- masking


def test_mask_statistics_over_many_rows():
    rng = np.random.default_rng(0)
    selected = candidates = masked = randomised = unchanged = 0
    for _ in range(2000):
        row = _row(rng)
        inputs, targets, weights = _mask(row, rng)
        np.testing.assert_array_equal(targets, row)
        chosen = weights == 1.0
        assert set(np.unique(weights)) <= {0.0, 1.0}
        assert not np.isin(row[chosen], SPECIAL).any(), "a special token was selected"
        np.testing.assert_array_equal(inputs[~chosen], row[~chosen])
        assert not np.isin(inputs[chosen & (inputs != MASK)], SPECIAL).any(), "a random id was special"
        selected += chosen.sum()
        candidates += (~np.isin(row, SPECIAL)).sum()
        masked += (inputs[chosen] == MASK).sum()
        same = inputs[chosen] == row[chosen]
        unchanged += same.sum()
        randomised += (~same & (inputs[chosen] != MASK)).sum()
    assert abs(selected / candidates - 0.15) <= 0.01
    # a random draw can hit the original id (1 in ~190): that counts as unchanged here
    assert abs(masked / selected - 0.8) <= 0.02
    assert abs(randomised / selected - 0.1) <= 0.02
    assert abs(unchanged / selected - 0.1) <= 0.02


def test_mask_budget_is_rounded_and_at_least_one():
    rng = np.random.default_rng(1)
    row = np.array([CLS, 11, 12, 13, SEP, PAD, PAD], np.int32)
    _, _, weights = _mask(row, rng)
    assert weights.sum() == 1  # round(0.15 * 3) = 0, raised to 1
    row = np.array([CLS] + list(range(10, 110)) + [SEP], np.int32)
    _, _, weights = _mask(row, rng)
    assert weights.sum() == 15
    only_special = np.array([CLS, SEP, PAD], np.int32)
    inputs, _, weights = _mask(only_special, rng)
    assert weights.sum() == 0
    np.testing.assert_array_equal(inputs, only_special)


def test_mask_is_deterministic_per_seed():
    row = _row(np.random.default_rng(5))
    first = _mask(row, np.random.default_rng(7))
    again = _mask(row, np.random.default_rng(7))
    other = _mask(row, np.random.default_rng(8))
    for x, y in zip(first, again):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(first[2], other[2])


def test_whole_word_masking_selects_every_piece_of_a_word():
    rng = np.random.default_rng(2)
    for _ in range(200):
        lengths = rng.integers(1, 4, 40)  # 40 words of 1-3 pieces
        starts = np.concatenate([[True]] + [[True] + [False] * (n - 1) for n in lengths] + [[True]])
        row = np.concatenate([[CLS], rng.integers(10, VOCAB, lengths.sum()), [SEP]]).astype(np.int32)
        _, _, weights = _mask(row, rng, word_starts=starts)
        chosen = weights == 1.0
        assert chosen.any()
        assert not chosen[0] and not chosen[-1]
        word_of = np.cumsum(starts) - 1
        for word in np.unique(word_of[chosen]):
            assert chosen[word_of == word].all(), "a word was selected partially"
        assert chosen.sum() <= max(int(0.15 * lengths.sum() + 0.5), lengths.max())


def test_word_starts_from_pieces():
    pieces = ["<cls>", "▁The", "▁un", "believ", "able", "!", "<sep>", "▁ok"]
    np.testing.assert_array_equal(masking.word_starts_from_pieces(pieces, "sentencepiece"),
                                  [1, 1, 1, 0, 0, 0, 1, 1])
    pieces = ["[CLS]", "the", "un", "##believ", "##able", "[SEP]", "##x"]
    np.testing.assert_array_equal(masking.word_starts_from_pieces(pieces, "wordpiece"), [1, 1, 1, 0, 0, 1, 1])
    with pytest.raises(ValueError, match="style"):
        masking.word_starts_from_pieces(pieces, "bpe")


# ----------------------------------------------------------------------------- sentences and pairs


def test_split_and_group_sentences():
    text = "First one. Second one!  Third?\nFourth line\n\n  Fifth.no split "
    assert masking.split_sentences(text) == ["First one.", "Second one!", "Third?", "Fourth line",
                                             "Fifth.no split"]
    sentences = [np.arange(n) for n in (3, 4, 2, 10, 1, 1)]
    chunks = masking.group_sentences(sentences, 8)
    assert [[len(s) for s in chunk] for chunk in chunks] == [[3, 4], [2], [10], [1, 1]]


def _chunk():
    return [np.arange(10, 13), np.arange(20, 24), np.arange(30, 32)]


def test_sop_balance_and_swapped_pairs_are_the_sentences_reversed():
    rng = np.random.default_rng(3)
    chunk = _chunk()
    tokens = np.concatenate(chunk)
    labels = []
    for _ in range(2000):
        a, b, label = masking.sentence_pair(chunk, rng, "sop", lambda r: [])
        labels.append(label)
        first, second = (b, a) if label else (a, b)
        np.testing.assert_array_equal(np.concatenate([first, second]), tokens)
        assert len(a) and len(b)
        assert first[0] == 10 and first[-1] in (12, 23)  # cut at a sentence boundary
    assert abs(np.mean(labels) - 0.5) < 0.04


def test_nsp_balance_and_random_next_sentences():
    rng = np.random.default_rng(4)
    chunk = _chunk()
    other = [np.array([90, 91]), np.array([92])]
    labels = []
    for _ in range(2000):
        a, b, label = masking.sentence_pair(chunk, rng, "nsp", lambda r: other)
        labels.append(label)
        assert a[0] == 10
        if label:
            np.testing.assert_array_equal(b, [90, 91, 92])
        else:
            np.testing.assert_array_equal(np.concatenate([a, b]), np.concatenate(chunk))
    assert abs(np.mean(labels) - 0.5) < 0.04


def test_sentence_pair_one_sentence_none_and_bad_task():
    rng = np.random.default_rng(5)
    a, b, label = masking.sentence_pair([np.arange(7)], rng, "sop", lambda r: [])
    np.testing.assert_array_equal(np.sort(np.concatenate([a, b])), np.arange(7))
    assert {len(a), len(b)} == {3, 4}
    a, b, label = masking.sentence_pair(_chunk(), rng, "none", lambda r: [])
    np.testing.assert_array_equal(a, np.concatenate(_chunk()))
    assert len(b) == 0 and label == 0
    with pytest.raises(ValueError, match="data.sentence_task"):
        masking.sentence_pair(_chunk(), rng, "next", lambda r: [])


def test_pair_row_layout():
    row = masking.pair_row([11, 12], [21, 22, 23], 10, cls_id=CLS, sep_id=SEP, pad_id=PAD)
    np.testing.assert_array_equal(row["inputs"], [CLS, 11, 12, SEP, 21, 22, 23, SEP, PAD, PAD])
    np.testing.assert_array_equal(row["token_types"], [0, 0, 0, 0, 1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(row["segment_ids"], [1, 1, 1, 1, 1, 1, 1, 1, 0, 0])
    assert all(v.dtype == np.int32 and v.shape == (10,) for v in row.values())
    single = masking.pair_row([11, 12], [], 6, cls_id=CLS, sep_id=SEP, pad_id=PAD)
    np.testing.assert_array_equal(single["inputs"], [CLS, 11, 12, SEP, PAD, PAD])
    np.testing.assert_array_equal(single["token_types"], [0] * 6)


def test_pair_row_truncates_the_longer_part_from_its_end():
    row = masking.pair_row(list(range(10, 20)), [21, 22], 9, cls_id=CLS, sep_id=SEP, pad_id=PAD)
    np.testing.assert_array_equal(row["inputs"], [CLS, 10, 11, 12, 13, SEP, 21, 22, SEP])
    row = masking.pair_row(list(range(10, 20)), list(range(30, 40)), 9, cls_id=CLS, sep_id=SEP, pad_id=PAD)
    np.testing.assert_array_equal(row["inputs"], [CLS, 10, 11, 12, SEP, 30, 31, 32, SEP])
    row = masking.pair_row(list(range(10, 20)), [], 5, cls_id=CLS, sep_id=SEP, pad_id=PAD)
    np.testing.assert_array_equal(row["inputs"], [CLS, 10, 11, 12, SEP])
    with pytest.raises(ValueError, match="data.seq_len"):
        masking.pair_row([1], [2], 4, cls_id=CLS, sep_id=SEP, pad_id=PAD)


# ----------------------------------------------------------------------------- word labels


def test_align_word_labels_first_piece():
    words = [np.array([11, 12]), np.array([13]), np.array([14, 15, 16])]
    row = masking.align_word_labels(words, [2, 0, 1], 10, cls_id=CLS, sep_id=SEP, pad_id=PAD)
    np.testing.assert_array_equal(row["inputs"], [CLS, 11, 12, 13, 14, 15, 16, SEP, PAD, PAD])
    np.testing.assert_array_equal(row["labels"], [0, 2, 0, 0, 1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(row["label_weights"], [0, 1, 0, 1, 1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(row["segment_ids"], [1] * 8 + [0] * 2)
    assert row["labels"].dtype == np.int32 and row["label_weights"].dtype == np.float32
    assert row["truncated_words"] == 0


def test_align_word_labels_drops_words_that_do_not_fit():
    words = [np.array([11, 12]), np.array([13, 14, 15]), np.array([16])]
    row = masking.align_word_labels(words, [1, 2, 3], 6, cls_id=CLS, sep_id=SEP, pad_id=PAD)
    np.testing.assert_array_equal(row["inputs"], [CLS, 11, 12, SEP, PAD, PAD])  # no partial word, no gap
    np.testing.assert_array_equal(row["labels"], [0, 1, 0, 0, 0, 0])
    assert row["truncated_words"] == 2
    with pytest.raises(ValueError, match="one label per word"):
        masking.align_word_labels(words, [1, 2], 6, cls_id=CLS, sep_id=SEP, pad_id=PAD)
