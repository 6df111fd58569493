"""T5 span corruption (Raffel et al. 2020, `t5.data.preprocessors.span_corruption`) in numpy + Grain.

A chunk of a document's token ids becomes (inputs, targets): about `noise_density` of its tokens, in spans of
mean length `mean_noise_span_length`, are removed from the inputs, each span replaced there by one sentinel;
the targets hold the removed spans, each introduced by the sentinel that replaced it. With sentinels s0, s1:

    tokens  a b c d e f g h          (noise: c d, g)
    inputs  a b s0 e f s1 EOS
    targets s0 c d s1 g EOS

Counts follow T5: noise tokens = round(len * density) (round half to even, as tf.round), kept within
[1, len - 1]; spans = round(noise / mean span length), at least 1 (and here at most the noise and kept token
counts, where T5 would fail); lengths below 2 are computed as 2 and cut, as T5 does. Span lengths come from
T5's random segmentation: noise and kept tokens are each split at random into that many non-empty spans,
interleaved starting with a kept span. Sentinels are `sentinel_ids[0], sentinel_ids[1], ...` in order of
appearance; `t5_sentinel_ids` gives T5's `<extra_id_0>` = vocab_size - 1, `<extra_id_1>` = vocab_size - 2, ...

`span_corruption_rows` is the Grain entry point: documents -> chunks of `span_corruption_lengths(Le)[0]`
tokens (so a full chunk's inputs are exactly Le tokens, T5's `random_spans_helper`) -> corrupted with an RNG
derived from (seed, the chunk's index in the stream), so a resumed pipeline corrupts exactly as an
uninterrupted one -> packed rows of `llm_jax.data.seq2seq_rows` (keys listed there). Unlike T5, which
concatenates documents before cutting chunks (so a chunk may straddle two documents), each document is cut on
its own and first-fit packing fills the rows with the shorter last chunks.
"""

from __future__ import annotations

from typing import Sequence

import grain
import numpy as np

from llm_jax.data import seq2seq_rows

_SPAN_STREAM = 0x5350414E  # keeps the span-corruption RNG apart from other uses of the seed


def _ids(tokens: Sequence[int] | np.ndarray) -> np.ndarray:
    return np.asarray(tokens, dtype=np.int32).reshape(-1)


def t5_sentinel_ids(vocab_size: int, count: int = 100) -> list[int]:
    """T5's sentinel ids: `<extra_id_k>` = vocab_size - 1 - k, for k < count."""
    if not 0 < count < vocab_size:
        raise ValueError(f"count={count} sentinels do not fit a vocabulary of {vocab_size}: "
                         "need 0 < count < vocab_size")
    return list(range(vocab_size - 1, vocab_size - 1 - count, -1))


def noise_span_counts(length: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0
                      ) -> tuple[int, int]:
    """(noise tokens, noise spans) of a chunk of `length` tokens (module docstring: T5's formulas, for
    max(length, 2) tokens)."""
    if not 0.0 < noise_density < 1.0:
        raise ValueError(f"noise_density={noise_density} (data.noise_density) must be in (0, 1)")
    if mean_noise_span_length < 1.0:
        raise ValueError(f"mean_noise_span_length={mean_noise_span_length} (data.mean_noise_span_length) must be >= 1")
    length = max(int(length), 2)
    num_noise = min(max(int(np.round(length * noise_density)), 1), length - 1)
    num_spans = max(int(np.round(num_noise / mean_noise_span_length)), 1)
    return num_noise, min(num_spans, num_noise, length - num_noise)


def random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """Lengths of a uniformly random split of num_items items into num_segments non-empty parts (T5's
    `_random_segmentation`: a shuffled set of num_segments - 1 cut points among the num_items - 1 gaps)."""
    if not 1 <= num_segments <= num_items:
        raise ValueError(f"cannot split {num_items} items into {num_segments} non-empty segments")
    first_in_segment = np.zeros(num_items, np.int64)
    first_in_segment[1:] = rng.permutation(np.arange(num_items - 1) < num_segments - 1)
    return np.bincount(np.cumsum(first_in_segment), minlength=num_segments)


def random_spans_noise_mask(length: int, rng: np.random.Generator, noise_density: float = 0.15,
                            mean_noise_span_length: float = 3.0) -> np.ndarray:
    """bool [length]: True on noise tokens, in spans laid out as T5's `random_spans_noise_mask`."""
    if length == 0:
        return np.zeros(0, bool)
    padded_length = max(length, 2)
    num_noise, num_spans = noise_span_counts(length, noise_density, mean_noise_span_length)
    noise_lengths = random_segmentation(num_noise, num_spans, rng)
    kept_lengths = random_segmentation(padded_length - num_noise, num_spans, rng)
    interleaved_lengths = np.stack([kept_lengths, noise_lengths], axis=1).reshape(-1)
    span_index = np.repeat(np.arange(2 * num_spans), interleaved_lengths)
    return (span_index % 2 == 1)[:length]


def spans_to_sentinels(tokens: np.ndarray, span_mask: np.ndarray, sentinel_ids: Sequence[int]) -> np.ndarray:
    """`tokens` with each run of True in `span_mask` replaced by one sentinel, the k-th run by
    sentinel_ids[k] (T5's `noise_span_to_unique_sentinel`)."""
    previous = np.zeros_like(span_mask)
    previous[1:] = span_mask[:-1]
    first_of_span = span_mask & ~previous
    num_spans = int(first_of_span.sum())
    if num_spans > len(sentinel_ids):
        raise ValueError(f"{num_spans} spans need {num_spans} sentinel ids, {len(sentinel_ids)} were given: pass more "
                         "sentinel ids or use shorter chunks")
    out = tokens.copy()
    out[first_of_span] = np.asarray(sentinel_ids[:num_spans], np.int32)
    return out[~(span_mask & previous)]


def span_corruption(tokens: Sequence[int] | np.ndarray, rng: np.random.Generator, *, sentinel_ids: Sequence[int],
                    eos_id: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) int32 of one chunk of token ids (module docstring), EOS appended to both."""
    tokens = _ids(tokens)
    noise_mask = random_spans_noise_mask(len(tokens), rng, noise_density, mean_noise_span_length)
    eos = np.array([eos_id], np.int32)
    inputs = np.concatenate([spans_to_sentinels(tokens, noise_mask, sentinel_ids), eos])
    targets = np.concatenate([spans_to_sentinels(tokens, ~noise_mask, sentinel_ids), eos])
    return inputs, targets


def _strip_eos(ids: np.ndarray, eos_id: int, name: str) -> np.ndarray:
    if len(ids) == 0 or ids[-1] != eos_id:
        raise ValueError(f"{name} does not end with eos_id={eos_id}: give the (inputs, targets) of span_corruption")
    return ids[:-1]


def fill_sentinels(inputs: Sequence[int] | np.ndarray, targets: Sequence[int] | np.ndarray, *,
                   sentinel_ids: Sequence[int], eos_id: int) -> np.ndarray:
    """The original token ids of a span-corrupted (inputs, targets) pair: each sentinel of the inputs
    replaced by the tokens that follow the same sentinel in the targets (for checks and for showing what a
    model filled in)."""
    inputs = _strip_eos(_ids(inputs), eos_id, "inputs")
    targets = _strip_eos(_ids(targets), eos_id, "targets")
    is_sentinel = np.isin(targets, np.asarray(sentinel_ids, np.int32))
    starts = list(np.flatnonzero(is_sentinel)) + [len(targets)]
    spans = {int(targets[a]): targets[a + 1:b] for a, b in zip(starts[:-1], starts[1:])}
    sentinel_set = set(int(s) for s in sentinel_ids)
    pieces = [spans.get(int(token), np.zeros(0, np.int32)) if int(token) in sentinel_set else np.array([token])
              for token in inputs]
    return np.concatenate(pieces).astype(np.int32) if pieces else np.zeros(0, np.int32)


def _corrupted_lengths(tokens_length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """(inputs, targets) lengths of a corrupted chunk of tokens_length tokens, EOS included."""
    num_noise, num_spans = noise_span_counts(tokens_length, noise_density, mean_noise_span_length)
    return tokens_length - num_noise + num_spans + 1, num_noise + num_spans + 1


def span_corruption_lengths(inputs_length: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0
                            ) -> tuple[int, int]:
    """(chunk length, targets length): the longest chunk whose corrupted inputs take at most `inputs_length`
    tokens, and the targets length of such a chunk; T5's `random_spans_helper`: 512 -> (568, 114) at density
    0.15, mean span 3. The inputs of such a chunk take exactly inputs_length tokens, except at noise_density
    0.5, where T5 drops one more token whenever the targets would be longer than the inputs."""
    if inputs_length < 3:
        raise ValueError(f"inputs_length={inputs_length} must be >= 3: the inputs hold a token, a sentinel and EOS")
    tokens_length = inputs_length - 1
    while _corrupted_lengths(tokens_length + 1, noise_density, mean_noise_span_length)[0] <= inputs_length:
        tokens_length += 1
    targets_length = _corrupted_lengths(tokens_length, noise_density, mean_noise_span_length)[1]
    if noise_density == 0.5 and targets_length > inputs_length:  # T5's tweak: targets no longer than inputs
        tokens_length -= 1
        targets_length -= 1
    return tokens_length, targets_length


class SplitDocument(grain.experimental.FlatMapTransform):
    """A document ({"tokens": ids} or an array of ids) -> its chunks of at most `chunk_length` ids (empty
    documents give none); a trailing eos_id, as `Tokenize` appends, is dropped: span corruption appends its own."""

    max_fan_out = 1 << 16

    def __init__(self, chunk_length: int, eos_id: int):
        self.chunk_length, self.eos_id = chunk_length, eos_id

    def flat_map(self, document: dict | np.ndarray) -> list[np.ndarray]:
        tokens = _ids(document["tokens"] if isinstance(document, dict) else document)
        if len(tokens) and tokens[-1] == self.eos_id:
            tokens = tokens[:-1]
        return [tokens[i:i + self.chunk_length] for i in range(0, len(tokens), self.chunk_length)]


class CorruptChunk:
    """(index, chunk) -> {"inputs", "targets"}, with an RNG derived from (seed, index): the same chunk index
    corrupts the same way whatever came before it."""

    def __init__(self, *, sentinel_ids: Sequence[int], eos_id: int, noise_density: float,
                 mean_noise_span_length: float, seed: int):
        self.sentinel_ids, self.eos_id, self.seed = [int(s) for s in sentinel_ids], int(eos_id), int(seed)
        self.noise_density, self.mean_noise_span_length = noise_density, mean_noise_span_length

    def __call__(self, index: int, chunk: np.ndarray) -> dict[str, np.ndarray]:
        rng = np.random.default_rng((self.seed, _SPAN_STREAM, int(index)))
        inputs, targets = span_corruption(chunk, rng, sentinel_ids=self.sentinel_ids, eos_id=self.eos_id,
                                          noise_density=self.noise_density,
                                          mean_noise_span_length=self.mean_noise_span_length)
        return {"inputs": inputs, "targets": targets}


def span_corruption_rows(documents: grain.IterDataset | grain.MapDataset, *, eos_id: int, pad_id: int,
                         sentinel_ids: Sequence[int], inputs_length: int, targets_length: int | None = None,
                         noise_density: float = 0.15, mean_noise_span_length: float = 3.0, seed: int = 0,
                         packed: bool = True, num_packing_bins: int = 16) -> grain.IterDataset:
    """Documents of token ids -> span-corrupted encoder-decoder rows (keys: `llm_jax.data.seq2seq_rows`).

    A document is {"tokens": int ids} (as `llm_jax.data.objectives.Tokenize` writes it; a trailing eos_id is
    dropped) or an array of ids.

    Documents are chunked so that a full chunk's inputs are exactly `inputs_length` tokens; targets_length
    defaults to (and must be at least) what a full chunk's targets take. The decoder starts from pad_id, as
    in T5. packed=False gives one chunk per row (evaluation by generation)."""
    chunk_length, needed_targets = span_corruption_lengths(inputs_length, noise_density, mean_noise_span_length)
    targets_length = needed_targets if targets_length is None else targets_length
    if targets_length < needed_targets:
        raise ValueError(f"targets_length={targets_length} is shorter than the {needed_targets} tokens the targets of "
                         f"a full chunk take (inputs_length={inputs_length}, noise_density={noise_density}, "
                         f"mean_noise_span_length={mean_noise_span_length}): use at least {needed_targets}")
    max_spans = noise_span_counts(chunk_length, noise_density, mean_noise_span_length)[1]
    if len(sentinel_ids) < max_spans:
        raise ValueError(f"chunks of {chunk_length} tokens have up to {max_spans} noise spans, each needing a sentinel "
                         f"id; {len(sentinel_ids)} were given")
    docs = documents.to_iter_dataset() if isinstance(documents, grain.MapDataset) else documents
    chunks = grain.experimental.FlatMapIterDataset(docs, SplitDocument(chunk_length, eos_id))
    examples = chunks.map_with_index(CorruptChunk(sentinel_ids=sentinel_ids, eos_id=eos_id, seed=seed,
                                                  noise_density=noise_density,
                                                  mean_noise_span_length=mean_noise_span_length))
    return seq2seq_rows.seq2seq_rows(examples, inputs_length, targets_length, packed=packed,
                                     decoder_start_id=pad_id, pad_id=pad_id, num_packing_bins=num_packing_bins,
                                     seed=seed)
