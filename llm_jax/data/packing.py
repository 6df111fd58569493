"""Sequence packing for language-model training: pure, deterministic numpy generators.

Two ways to turn variable-length documents into fixed [T] rows, plus batching:

* `concat_and_split`: GPT-style. Documents are concatenated into one stream (with `eos_id` appended to
  each) and cut into disjoint chunks of seq_len + 1 tokens; inputs = chunk[:-1], targets = chunk[1:].
  Optionally each row carries "segment_ids" (1, 2, ... per document inside the row) and "positions"
  (restarting at 0 at every document start and at the row start), so the decoder can block attention
  across documents; `mask_cross_document` zeroes the weight of targets that belong to another document
  than their input token.
* `first_fit_pack`: first-fit bin packing of whole examples (dicts of 1-D arrays) into rows of seq_len,
  T5/seqio style: "segment_ids" 1, 2, ... per packed example, 0 on padding; "positions" restart at 0 per
  segment (0 on padding); every key is padded with 0 (so "weights" is 0 on padding).
* `batch`: stacks rows to [B, T].

Everything here is a plain function of its inputs (no global state, no randomness), so it can sit inside
a Grain MapTransform / IterDataset and reproduces the same rows for the same input order.

Row keys follow `llm_jax.data.lm_batches`: "inputs", "targets" int32 [T], "weights" float32 [T];
`llm_jax.training.steps.token_losses` passes batch["positions"] and batch["segment_ids"] to the model.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping

import grain
import numpy as np

from llm_jax.registry import Registry

Example = dict[str, np.ndarray]
RESERVED_SUFFIXES = ("segment_ids", "positions")


# ----------------------------------------------------------------------------- helpers


def lm_example(tokens: np.ndarray, eos_id: int | None = None) -> Example:
    """One document as a next-token example: inputs = doc[:-1], targets = doc[1:] (eos appended first)."""
    tokens = np.asarray(tokens, np.int32).reshape(-1)
    if eos_id is not None:
        tokens = np.append(tokens, np.int32(eos_id))
    return {"inputs": tokens[:-1], "targets": tokens[1:], "weights": np.ones(max(len(tokens) - 1, 0), np.float32)}


def segment_positions(segment_ids: np.ndarray) -> np.ndarray:
    """Position of each token inside its run of equal segment ids (restarting at 0 at every change)."""
    segment_ids = np.asarray(segment_ids)
    n = len(segment_ids)
    if n == 0:
        return np.zeros(0, np.int32)
    index = np.arange(n)
    starts = np.r_[True, segment_ids[1:] != segment_ids[:-1]]
    return (index - np.maximum.accumulate(np.where(starts, index, 0))).astype(np.int32)


# ----------------------------------------------------------------------------- concat and split


def concat_and_split(docs: Iterable[np.ndarray], seq_len: int, eos_id: int | None, *,
                     with_segments: bool = False, mask_cross_document: bool = False,
                     drop_remainder: bool = True) -> Iterator[Example]:
    """Concatenates documents (each followed by `eos_id` when given) and cuts disjoint chunks of seq_len+1.

    Yields {"inputs", "targets", "weights"} of length seq_len; with `with_segments`, also "segment_ids"
    (1 for the first document touching the row, +1 at each later document start) and "positions" (0 at
    the row start and at each document start). An eos belongs to the document it ends, so predicting eos
    is within the document and predicting the next document's first token (from eos, or from the last
    token when `eos_id` is None) crosses a boundary: `mask_cross_document` gives those targets weight 0.

    Consecutive rows share no token: the (last token of one chunk -> first of the next) pair is not a
    training target. The tail shorter than seq_len+1 is dropped, or with `drop_remainder=False` emitted
    once padded with 0 (weight 0, segment 0, position 0 on padding) if it holds at least one target.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be >= 1")
    if mask_cross_document and not with_segments:
        raise ValueError("mask_cross_document needs with_segments=True (document boundaries)")
    chunk = seq_len + 1
    tokens = np.zeros(0, np.int32)
    doc_ids = np.zeros(0, np.int64)  # document index of each buffered token (global, increasing)
    next_doc = 0

    def emit(span: np.ndarray, span_docs: np.ndarray, valid: int) -> Example:
        # `valid` = number of real targets (<= seq_len); the rest is padding.
        inputs = np.zeros(seq_len, np.int32)
        targets = np.zeros(seq_len, np.int32)
        weights = np.zeros(seq_len, np.float32)
        inputs[:valid], targets[:valid], weights[:valid] = span[:valid], span[1:valid + 1], 1.0
        row = {"inputs": inputs, "targets": targets, "weights": weights}
        if with_segments:
            in_docs = span_docs[:valid]
            starts = np.r_[True, in_docs[1:] != in_docs[:-1]] if valid else np.zeros(0, bool)
            segment_ids = np.zeros(seq_len, np.int32)
            segment_ids[:valid] = np.cumsum(starts)
            positions = np.zeros(seq_len, np.int32)
            positions[:valid] = segment_positions(in_docs)
            row["segment_ids"], row["positions"] = segment_ids, positions
            if mask_cross_document:
                weights[:valid] *= (span_docs[1:valid + 1] == in_docs)
        return row

    for doc in docs:
        doc = np.asarray(doc).reshape(-1).astype(np.int32)
        if eos_id is not None:
            doc = np.append(doc, np.int32(eos_id))
        if len(doc) == 0:
            continue
        tokens = np.concatenate([tokens, doc])
        doc_ids = np.concatenate([doc_ids, np.full(len(doc), next_doc, np.int64)])
        next_doc += 1
        num_chunks = len(tokens) // chunk
        for i in range(num_chunks):
            sl = slice(i * chunk, (i + 1) * chunk)
            yield emit(tokens[sl], doc_ids[sl], seq_len)
        if num_chunks:
            tokens, doc_ids = tokens[num_chunks * chunk:], doc_ids[num_chunks * chunk:]
    if not drop_remainder and len(tokens) >= 2:
        yield emit(tokens, doc_ids, len(tokens) - 1)


# ----------------------------------------------------------------------------- first-fit packing


class _Bin:
    """An open row: the examples placed so far and the fill of each length group."""

    def __init__(self, groups: Iterable[str]):
        self.parts: list[Example] = []
        self.fill = {group: 0 for group in groups}


def _group_names(keys: Iterable[str], lengths_from: Mapping[str, str] | None) -> dict[str, str]:
    keys = list(keys)
    if lengths_from is None:
        return {key: "" for key in keys}
    missing = [key for key in keys if key not in lengths_from]
    if missing:
        raise ValueError(f"lengths_from has no group for keys {missing}; it maps {dict(lengths_from)}")
    return {key: lengths_from[key] for key in keys}


def first_fit_pack(examples: Iterable[Example], seq_len: int | Mapping[str, int], *, max_pending: int = 64,
                   too_long: str = "truncate", lengths_from: Mapping[str, str] | None = None,
                   stats: dict[str, int] | None = None) -> Iterator[Example]:
    """First-fit packing of variable-length examples into rows of seq_len, padded with 0.

    Each example is a dict of 1-D arrays. Keys are grouped by `lengths_from` (key -> group name); keys of
    one group must have equal length in every example and share one fill level, segment ids and
    positions. Default (None): all keys form one group, output keys "segment_ids" and "positions". With
    several groups (e.g. seq2seq {"inputs": "inputs", "targets": "targets"}) the outputs are
    "<group>_segment_ids" and "<group>_positions", and `seq_len` may be a {group: length} mapping.

    Each example goes to the first open bin (in opening order) where every group still has room; else a
    new bin opens. A bin is emitted as soon as one of its groups is exactly full; when more than
    `max_pending` bins are open the oldest is emitted; at the end the rest are emitted oldest first.
    Segment ids are 1, 2, ... in placement order within a row (the same id in every group), 0 on padding;
    positions restart at 0 per segment, 0 on padding. Examples longer than their group's length are cut
    to it (`too_long="truncate"`, counted in stats["truncated"]) or raise (`"error"`); examples with no
    tokens at all are skipped (stats["empty"]). `stats`, when given, is updated in place with "examples",
    "rows", "truncated", "empty", "tokens" (per-group sums over all groups) and "padding".
    """
    if too_long not in ("truncate", "error"):
        raise ValueError(f"too_long={too_long!r} must be 'truncate' or 'error'")
    if max_pending < 1:
        raise ValueError(f"max_pending={max_pending} must be >= 1")
    if stats is None:
        stats = {}
    for name in ("examples", "rows", "truncated", "empty", "tokens", "padding"):
        stats.setdefault(name, 0)

    key_group: dict[str, str] | None = None
    dtypes: dict[str, np.dtype] = {}
    lengths: dict[str, int] = {}
    open_bins: list[_Bin] = []

    def out_name(group: str, suffix: str) -> str:
        return f"{group}_{suffix}" if group else suffix

    def materialize(bin_: _Bin) -> Example:
        row: Example = {}
        for key, group in key_group.items():
            values = np.zeros(lengths[group], dtypes[key])
            offset = 0
            for part in bin_.parts:
                n = len(part[key])
                values[offset:offset + n] = part[key]
                offset += n
            row[key] = values
        for group in dict.fromkeys(key_group.values()):
            segment_ids = np.zeros(lengths[group], np.int32)
            positions = np.zeros(lengths[group], np.int32)
            offset = 0
            some_key = next(key for key, g in key_group.items() if g == group)
            for index, part in enumerate(bin_.parts, start=1):
                n = len(part[some_key])
                segment_ids[offset:offset + n] = index
                positions[offset:offset + n] = np.arange(n)
                offset += n
            row[out_name(group, "segment_ids")] = segment_ids
            row[out_name(group, "positions")] = positions
            stats["padding"] += lengths[group] - offset
        stats["rows"] += 1
        return row

    for example in examples:
        if key_group is None:  # the first example fixes keys, groups and dtypes
            if not example:
                raise ValueError("examples must have at least one key")
            key_group = _group_names(example.keys(), lengths_from)
            for key in example:
                if any(key == suffix or key.endswith("_" + suffix) for suffix in RESERVED_SUFFIXES):
                    raise ValueError(f"example key {key!r} is reserved for the packed output")
                dtypes[key] = np.asarray(example[key]).dtype
            for group in dict.fromkeys(key_group.values()):
                length = seq_len[group] if isinstance(seq_len, Mapping) else seq_len
                if length < 1:
                    raise ValueError(f"seq_len={length} for group {group or '(all keys)'!r} must be >= 1")
                lengths[group] = int(length)
        if set(example) != set(key_group):
            raise ValueError(f"example keys {sorted(example)} differ from the first example's {sorted(key_group)}")
        stats["examples"] += 1
        part = {key: np.asarray(value).reshape(-1) if np.ndim(value) == 0 else np.asarray(value)
                for key, value in example.items()}
        group_len: dict[str, int] = {}
        for key, value in part.items():
            if value.ndim != 1:
                raise ValueError(f"example[{key!r}] has shape {value.shape}; packing takes 1-D arrays")
            group = key_group[key]
            if group_len.setdefault(group, len(value)) != len(value):
                raise ValueError(f"keys of group {group or '(all keys)'!r} have different lengths in one example: "
                                 f"{ {k: len(v) for k, v in part.items() if key_group[k] == group} }")
        if all(n == 0 for n in group_len.values()):
            stats["empty"] += 1
            continue
        over = {group: n for group, n in group_len.items() if n > lengths[group]}
        if over:
            if too_long == "error":
                raise ValueError(f"example {stats['examples'] - 1} is longer than seq_len: "
                                 f"{ {g or '(all keys)': (n, lengths[g]) for g, n in over.items()} } (length, limit)")
            stats["truncated"] += 1
            part = {key: value[:lengths[key_group[key]]] for key, value in part.items()}
            group_len = {group: min(n, lengths[group]) for group, n in group_len.items()}
        stats["tokens"] += sum(group_len.values())

        target = next((b for b in open_bins
                       if all(b.fill[g] + n <= lengths[g] for g, n in group_len.items())), None)
        if target is None:
            target = _Bin(lengths)
            open_bins.append(target)
        target.parts.append(part)
        for group, n in group_len.items():
            target.fill[group] += n
        if any(target.fill[g] == lengths[g] for g in lengths):
            open_bins.remove(target)
            yield materialize(target)
        while len(open_bins) > max_pending:
            yield materialize(open_bins.pop(0))
    for bin_ in open_bins:
        yield materialize(bin_)


# ----------------------------------------------------------------------------- batching


def stack_rows(rows: list[Example]) -> Example:
    """Rows (or batches) with the same keys stacked on a new leading axis, per key."""
    return {key: np.stack([row[key] for row in rows]) for key in rows[0]}


def batch(examples: Iterable[Example], batch_size: int, drop_remainder: bool) -> Iterator[Example]:
    """Stacks consecutive rows to [B, ...] per key; a short final batch is dropped or yielded as it is."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    pending: list[Example] = []
    for example in examples:
        if pending and set(example) != set(pending[0]):
            raise ValueError(f"row keys {sorted(example)} differ from {sorted(pending[0])}")
        pending.append(example)
        if len(pending) == batch_size:
            yield stack_rows(pending)
            pending = []
    if pending and not drop_remainder:
        yield stack_rows(pending)


# ----------------------------------------------------------------------------- Grain packers (data.packing)
# Each takes a Grain IterDataset of {"tokens": [n]} documents and returns one of rows {"tokens",
# "tokens_segment_ids", "tokens_positions"} of `length`; their iterators checkpoint with the pipeline.

PACKINGS: Registry = Registry("packing")


@PACKINGS.register("concat_split")
def grain_concat_split(docs, length: int, data) -> Any:
    """Documents concatenated and cut into disjoint rows (a long document continues in the next row)."""
    return grain.experimental.ConcatThenSplitIterDataset(docs, length_struct={"tokens": length})


@PACKINGS.register("first_fit")
def grain_first_fit(docs, length: int, data) -> Any:
    """Whole documents placed first-fit into data.packing_bins open rows, padded; longer documents are cut
    into pieces of `length` first, so no token is lost."""
    import grain

    pieces = grain.experimental.FlatMapIterDataset(docs, _SplitLongDocuments(length))
    return grain.experimental.FirstFitPackIterDataset(pieces, length_struct={"tokens": length},
                                                      num_packing_bins=data.packing_bins, seed=data.seed)


class _SplitLongDocuments(grain.experimental.FlatMapTransform):
    """A Grain FlatMapTransform: a document as pieces of at most `length` tokens."""

    def __init__(self, length: int):
        self.length = length
        self.max_fan_out = 1 << 16

    def flat_map(self, document: dict) -> list[dict]:
        tokens = document["tokens"]
        return [{"tokens": tokens[i:i + self.length]} for i in range(0, max(len(tokens), 1), self.length)]
