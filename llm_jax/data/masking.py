"""BERT-style example building: sentences, sentence pairs (NSP / SOP), masked-LM masking, word labels.

Pure numpy functions that the encoder tasks (`llm_jax.tasks`) call on tokenized documents; every random
choice comes from the `np.random.Generator` passed in, so a seed gives the same rows on every host.
Token ids are int32 arrays; "special ids" are the ids of [CLS], [SEP], [PAD], [MASK] and the like, which
are never masked (give the padding id among them).
"""

from __future__ import annotations

import math
import re
from typing import Callable, Collection, Sequence

import numpy as np

SENTENCE_TASKS = ("nsp", "sop", "none")
WORD_STYLES = ("sentencepiece", "wordpiece")
MASK_SHARE, RANDOM_SHARE = 0.8, 0.1  # of the selected tokens; the remaining 10% stay unchanged
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n")


def _ids(tokens: Sequence[int] | np.ndarray) -> np.ndarray:
    return np.asarray(tokens, dtype=np.int32).reshape(-1)


# ----------------------------------------------------------------------------- sentences and pairs


def split_sentences(text: str) -> list[str]:
    """The sentences of a document: split at newlines and after . ! ? followed by whitespace; stripped,
    empty ones dropped. (A heuristic: "Dr. Smith" splits too; NSP/SOP only need roughly sentence-sized parts.)"""
    return [part.strip() for part in _SENTENCE_END.split(text) if part.strip()]


def group_sentences(sentence_ids: list[np.ndarray], max_tokens: int) -> list[list[np.ndarray]]:
    """Greedy chunks of consecutive sentences with at most `max_tokens` tokens in all; a sentence longer
    than `max_tokens` is a chunk of its own (`pair_row` truncates it). Empty sentences are dropped."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens} must be >= 1")
    chunks: list[list[np.ndarray]] = []
    chunk: list[np.ndarray] = []
    total = 0
    for sentence in sentence_ids:
        if len(sentence) == 0:
            continue
        if chunk and total + len(sentence) > max_tokens:
            chunks.append(chunk)
            chunk, total = [], 0
        chunk.append(sentence)
        total += len(sentence)
    if chunk:
        chunks.append(chunk)
    return chunks


def _concat(sentences: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate([_ids(s) for s in sentences]) if sentences else np.zeros(0, np.int32)


def sentence_pair(
    chunk: list[np.ndarray], rng: np.random.Generator, task: str,
    random_sentences: Callable[[np.random.Generator], list[np.ndarray]],
) -> tuple[np.ndarray, np.ndarray, int]:
    """(A, B, label) from a chunk of sentences, BERT's recipe.

    The chunk is split at a random sentence boundary (a one-sentence chunk: in the middle of its tokens) into
    A (the first part) and B (the rest). task="nsp": with probability 0.5 B is replaced by the sentences
    `random_sentences(rng)` of another document, label 1 = not next, 0 = is next (an empty draw keeps the
    real B). task="sop": with probability 0.5 A and B swap, label 1 = swapped, 0 = in order. task="none":
    (all tokens, empty, 0), as is any chunk of fewer than 2 tokens.
    """
    if task not in SENTENCE_TASKS:
        raise ValueError(f"sentence task {task!r} (data.sentence_task): expected one of {SENTENCE_TASKS}")
    empty = np.zeros(0, np.int32)
    tokens = _concat(chunk)
    if task == "none" or len(tokens) < 2:
        return tokens, empty, 0
    if len(chunk) >= 2:
        cut = int(rng.integers(1, len(chunk)))
        a, b = _concat(chunk[:cut]), _concat(chunk[cut:])
    else:
        a, b = tokens[: len(tokens) // 2], tokens[len(tokens) // 2:]
    coin = rng.random() < 0.5
    if task == "nsp":
        if coin:
            other = _concat(random_sentences(rng))
            if len(other):
                return a, other, 1
        return a, b, 0
    return (b, a, 1) if coin else (a, b, 0)


def truncate_pair(a: Sequence[int], b: Sequence[int], budget: int) -> tuple[Sequence[int], Sequence[int]]:
    """BERT's truncate_seq_pair: drop tokens from the end of the longer of a and b (b on ties) until they fit."""
    len_a, len_b = len(a), len(b)
    while len_a + len_b > budget:
        if len_a > len_b:
            len_a -= 1
        else:
            len_b -= 1
    return a[:len_a], b[:len_b]


def pair_row(a: Sequence[int] | np.ndarray, b: Sequence[int] | np.ndarray, seq_len: int, *,
             cls_id: int, sep_id: int, pad_id: int) -> dict[str, np.ndarray]:
    """One encoder row of seq_len int32s: "inputs" = [CLS] a [SEP] (b [SEP] when b is non-empty) padded
    with pad_id; "token_types" 0 on [CLS], a and its [SEP], 1 on b and its [SEP], 0 on padding;
    "segment_ids" 1 on real tokens, 0 on padding. Too long a pair loses tokens from the end of the
    longer part first, so the row always fits."""
    a, b = _ids(a), _ids(b)
    has_b = len(b) > 0
    need = 5 if has_b else 2  # [CLS] x [SEP] y [SEP] keeps one token of each part
    if seq_len < need:
        raise ValueError(f"seq_len={seq_len} (data.seq_len) is too short for a {'pair' if has_b else 'row'}: "
                         f"it needs at least {need} tokens")
    a, b = truncate_pair(a, b, seq_len - 2 - int(has_b))
    parts = [np.array([cls_id], np.int32), a, np.array([sep_id], np.int32)]
    if has_b:
        parts += [b, np.array([sep_id], np.int32)]
    real = np.concatenate(parts)
    inputs = np.full(seq_len, pad_id, np.int32)
    inputs[: len(real)] = real
    token_types = np.zeros(seq_len, np.int32)
    if has_b:
        token_types[len(a) + 2: len(real)] = 1
    segment_ids = np.zeros(seq_len, np.int32)
    segment_ids[: len(real)] = 1
    return {"inputs": inputs, "token_types": token_types, "segment_ids": segment_ids}


# ----------------------------------------------------------------------------- masked LM


def _budget(probability: float, candidates: int) -> int:
    """round(probability * candidates), at least 1 when there is a candidate."""
    if candidates == 0:
        return 0
    return max(1, int(math.floor(probability * candidates + 0.5)))


def _words(candidates: np.ndarray, word_starts: np.ndarray) -> list[np.ndarray]:
    """Candidate positions grouped into words: a word starts where word_starts is True or after a non-candidate."""
    starts = word_starts & candidates
    starts[1:] |= candidates[1:] & ~candidates[:-1]
    starts[0] = candidates[0]
    positions = np.flatnonzero(candidates)
    word_index = np.cumsum(starts)[positions]
    return np.split(positions, np.flatnonzero(np.diff(word_index)) + 1) if len(positions) else []


def _select_words(words: list[np.ndarray], budget: int, rng: np.random.Generator) -> np.ndarray:
    """Whole words in random order while they fit the budget (BERT's rule); the first word if none fits."""
    order = rng.permutation(len(words))
    chosen: list[np.ndarray] = []
    total = 0
    for index in order:
        if total >= budget:
            break
        if total + len(words[index]) <= budget:
            chosen.append(words[index])
            total += len(words[index])
    if not chosen and words:
        chosen.append(words[order[0]])
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


def _random_ids(count: int, vocab_size: int, special: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`count` ids drawn uniformly from [0, vocab_size) minus the special ids (redrawn until none is special)."""
    if count and vocab_size <= len(special) and np.isin(np.arange(vocab_size), special).all():
        raise ValueError(f"vocab_size={vocab_size}: every id is special, there is no id to put in at random")
    ids = rng.integers(0, vocab_size, count)
    bad = np.isin(ids, special)
    while bad.any():
        ids[bad] = rng.integers(0, vocab_size, int(bad.sum()))
        bad = np.isin(ids, special)
    return ids


def mask_tokens(inputs: Sequence[int] | np.ndarray, rng: np.random.Generator, *, vocab_size: int, mask_id: int,
                special_ids: Collection[int], probability: float = 0.15,
                word_starts: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """BERT masking of one row: (masked inputs, targets = the original inputs, weights).

    Selects round(probability * candidates) positions (at least 1 when there is a candidate) among the
    tokens that are not special ids (include the padding id in `special_ids`); with `word_starts` (bool per
    position, True where a word begins) it selects whole words, all pieces of each, while they fit the
    budget. Of the selected positions 80% become mask_id, 10% a random non-special id in [0, vocab_size),
    10% stay unchanged. weights: float32 1.0 on the selected positions, 0 elsewhere.
    """
    if np.ndim(inputs) != 1:
        raise ValueError(f"inputs has shape {np.shape(inputs)}: mask_tokens takes one row (1-D) at a time")
    targets = _ids(inputs)
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"probability={probability} (data.mlm_probability) must be in [0, 1]")
    special = np.asarray(sorted(set(int(i) for i in special_ids) | {int(mask_id)}), np.int64)
    candidates = ~np.isin(targets, special)
    budget = _budget(probability, int(candidates.sum()))
    if word_starts is None:
        selected = np.sort(rng.choice(np.flatnonzero(candidates), budget, replace=False))
    else:
        word_starts = np.asarray(word_starts, bool).reshape(-1)
        if word_starts.shape != targets.shape:
            raise ValueError(f"word_starts has {len(word_starts)} entries for {len(targets)} tokens: "
                             "give one per token")
        selected = _select_words(_words(candidates, word_starts), budget, rng) if budget else np.zeros(0, np.int64)
    draw = rng.random(len(selected))
    masked = targets.copy()
    masked[selected[draw < MASK_SHARE]] = mask_id
    randomised = selected[(draw >= MASK_SHARE) & (draw < MASK_SHARE + RANDOM_SHARE)]
    masked[randomised] = _random_ids(len(randomised), vocab_size, special, rng)
    weights = np.zeros(len(targets), np.float32)
    weights[selected] = 1.0
    return masked, targets, weights


def word_starts_from_pieces(pieces: Sequence[str], style: str, *,
                            specials: Collection[str] | None = None) -> np.ndarray:
    """True where a piece begins a word. style "sentencepiece": a piece starting with "▁"; "wordpiece": a
    piece not starting with "##". Special pieces (default: llm_jax's and BERT's special tokens), the first
    piece and a piece right after a special piece also begin words."""
    if style not in WORD_STYLES:
        raise ValueError(f"style={style!r}: expected one of {WORD_STYLES}")
    if specials is None:
        from llm_jax.data.tokenizers import SPECIAL_TOKENS, WORDPIECE_SPECIALS

        specials = set(SPECIAL_TOKENS.values()) | set(WORDPIECE_SPECIALS.values())
    is_special = np.array([piece in specials for piece in pieces], bool)
    if style == "sentencepiece":
        starts = np.array([piece.startswith("▁") for piece in pieces], bool)
    else:
        starts = np.array([not piece.startswith("##") for piece in pieces], bool)
    starts |= is_special
    if len(starts):
        starts[0] = True
        starts[1:] |= is_special[:-1]
    return starts


# ----------------------------------------------------------------------------- token labeling


def align_word_labels(word_ids: list[np.ndarray], word_labels: Sequence[int], seq_len: int, *,
                      cls_id: int, sep_id: int, pad_id: int) -> dict[str, np.ndarray | int]:
    """A token-labeling row from the sub-word ids of each word and the words' labels.

    "inputs" = [CLS] the pieces of each word [SEP], padded with pad_id; "labels" int32 with each word's
    label on its first piece and 0 elsewhere; "label_weights" float32 1.0 on first pieces only;
    "segment_ids" 1 on real tokens, 0 on padding. Words that do not fit are dropped whole, from the first
    that does not fit to the end; "truncated_words" counts them, and words without pieces (which cannot
    carry a label) too.
    """
    if len(word_ids) != len(word_labels):
        raise ValueError(f"{len(word_ids)} words but {len(word_labels)} word labels: give one label per word")
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len} (data.seq_len) is too short: [CLS] and [SEP] need 2 tokens")
    pieces, first_positions, labels = [], [], []
    used, dropped, budget = 0, 0, seq_len - 2
    for index, (ids, label) in enumerate(zip(word_ids, word_labels)):
        ids = _ids(ids)
        if used + len(ids) > budget:
            dropped += len(word_ids) - index
            break
        if len(ids) == 0:
            dropped += 1
            continue
        first_positions.append(1 + used)
        labels.append(int(label))
        pieces.append(ids)
        used += len(ids)
    real = np.concatenate([np.array([cls_id], np.int32), *pieces, np.array([sep_id], np.int32)])
    inputs = np.full(seq_len, pad_id, np.int32)
    inputs[: len(real)] = real
    row_labels = np.zeros(seq_len, np.int32)
    row_labels[first_positions] = labels
    label_weights = np.zeros(seq_len, np.float32)
    label_weights[first_positions] = 1.0
    segment_ids = np.zeros(seq_len, np.int32)
    segment_ids[: len(real)] = 1
    return {"inputs": inputs, "labels": row_labels, "label_weights": label_weights, "segment_ids": segment_ids,
            "truncated_words": dropped}
