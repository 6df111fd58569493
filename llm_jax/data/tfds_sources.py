"""Local text files -> prepared TFDS datasets (array_record), read back without TensorFlow.

`prepare` turns a `LocalSource` (plain text, JSONL, TSV or CoNLL files) into a TFDS dataset in the
`array_record` file format under `data_dir/name/<fingerprint>/`, and `data_source` reads a split of it
back as a random-access source of dicts (`len()`, `[i]`) through `builder.as_data_source`, which needs
`array_record` but not TensorFlow.

Records are `{"text": str}`, plus
- `"text_b": str` for sentence pairs (two TSV text columns, or JSONL `text_b_field`);
- `"label": int` (an index into `LocalSource.labels`) for classification (TSV `label_column`, JSONL
  `label_field`);
- `"words": list[str]` and `"word_labels": list[int]` (indices into `labels`, one per word) for token
  labeling (CoNLL files, or JSONL with `tags_field`); their "text" is `" ".join(words)`.
Records keep the order of the files (sorted) and of the lines in them: shuffling is disabled.

The fingerprint covers every source file (absolute path, size, mtime, sha256 of the content), every
option of the sources and `skip_bad_records`: an unchanged source reuses the prepared dataset untouched,
a changed one is prepared again into a new fingerprint directory.  `data_dir/name/latest.json` names the
fingerprint that `data_source` reads, and its builder directory relative to `data_dir/name` (so it resolves
from any working directory, and after the data directory moves).  A failed `prepare` removes what it
created: no partial fingerprint directory, and no dataset directory when there was none before.

Bad input raises `ValueError("FILE:LINE: ...")` (1-based line; invalid UTF-8 also gives the byte
offset), or with `skip_bad_records=True` the bad record is skipped and counted: the counts are logged
and stored in the dataset's metadata (`builder.info.metadata["skipped_records"]`, also per split and
with the first reasons) and returned by `skipped_records(builder)`.

TFDS notes (tensorflow-datasets 4.9.x, no TensorFlow installed): `tfds.features.Text`, `ClassLabel` and
a `Sequence` of either encode and decode without TensorFlow on this path; `Text` decodes to `bytes` and
`ClassLabel` to numpy integers, so `DecodedDataSource` turns them into `str`, `int` and lists of those
(plain Python values pickle cheaply into Grain workers).  The builder builds its `DatasetInfo` directly
(`dataset_info_from_configs` would look for metadata files next to this module) and is not registered
(`skip_registration=True`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import json
import logging
import os
import shutil
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

logger = logging.getLogger(__name__)

KINDS = ("text", "jsonl", "tsv", "conll")
SPLIT_BY = ("file", "blank_line", "line")
FORMAT_VERSION = 2  # bump when the parsing or the record layout changes: every fingerprint changes
LATEST_FILE = "latest.json"
LOCK_FILE = ".prepare.lock"
MAX_REASONS = 20  # skipped-record reasons kept in the metadata


@dataclasses.dataclass(frozen=True)
class LocalSource:
    """Local text files and how to cut them into records.

    kind: "text" | "jsonl" | "tsv".
    paths: files or glob patterns; expanded, deduplicated and sorted (by absolute path).
    split_by (text): "file" (one document per file, content kept exactly), "blank_line" (paragraphs
      separated by blank lines, joined with "\\n") or "line" (one document per non-blank line).
    text_field (jsonl): the string field of each JSON object; blank lines are ignored.
    text_columns (tsv): one column, or two for sentence pairs ("text", "text_b").
    label_column (tsv): the label column; `labels` lists the allowed values, "label" is the index.
    Columns are header names with `has_header=True`, else 0-based indices (int or digit string).
    TSV rows are split on `delimiter` literally (no quoting); blank lines are ignored.
    label_field (jsonl): the field of each object's label (a string, or an int compared as str(value)
      with `labels`); "label" is its index. text_b_field (jsonl): the second text of a pair.
    words_field, tags_field (jsonl): token labeling: lists of words and of their tags (one per word,
      each in `labels`); set both, with `labels`, instead of `text_field`/`label_field`/`text_b_field`.
    conll_columns (conll): the (word, tag) column indices (negative allowed) of each whitespace-separated
      line; one token per line, blank lines end sentences, "-DOCSTART-" lines are skipped, and so are comment
      lines (first column "#", before a sentence's first token: CoNLL-U's "# text = ..."); a "#" line inside
      a sentence and tokens like "#hashtag" are tokens.
    """

    kind: str
    paths: tuple[str, ...]
    split_by: str = "file"
    text_field: str = "text"
    text_columns: tuple[str, ...] = ("text",)
    label_column: str | None = None
    labels: tuple[str, ...] | None = None
    has_header: bool = True
    delimiter: str = "\t"
    label_field: str | None = None
    text_b_field: str | None = None
    words_field: str | None = None
    tags_field: str | None = None
    conll_columns: tuple[int, int] = (0, -1)

    def __post_init__(self):
        if isinstance(self.paths, str):
            object.__setattr__(self, "paths", (self.paths,))
        for field in ("paths", "text_columns", "labels", "conll_columns"):
            value = getattr(self, field)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, field, tuple(value))
        if self.kind not in KINDS:
            raise ValueError(f"LocalSource.kind={self.kind!r}: expected one of {KINDS}")
        if not self.paths:
            raise ValueError("LocalSource.paths is empty: give at least one file or glob")
        if self.kind == "text" and self.split_by not in SPLIT_BY:
            raise ValueError(f"LocalSource.split_by={self.split_by!r}: expected one of {SPLIT_BY}")
        if self.labels is not None and (not self.labels or len(set(self.labels)) != len(self.labels)):
            raise ValueError(f"LocalSource.labels={self.labels!r}: give distinct labels")
        {"tsv": self._check_tsv, "jsonl": self._check_jsonl, "conll": self._check_conll}.get(self.kind, _no_check)()

    def _check_tsv(self) -> None:
        if len(self.text_columns) not in (1, 2):
            raise ValueError(
                f"LocalSource.text_columns={self.text_columns!r}: give one column, or two for sentence pairs"
            )
        if (self.label_column is None) != (self.labels is None):
            raise ValueError("LocalSource.label_column and LocalSource.labels go together: set both or neither")
        if not self.delimiter:
            raise ValueError("LocalSource.delimiter is empty")

    def _check_jsonl(self) -> None:
        if (self.words_field is None) != (self.tags_field is None):
            raise ValueError("LocalSource.words_field and LocalSource.tags_field go together (token labeling): "
                             "set both or neither")
        if self.tags_field is not None and (self.label_field is not None or self.text_b_field is not None):
            raise ValueError("LocalSource.tags_field (token labeling) excludes label_field and text_b_field "
                             "(classification): a JSONL source is one or the other")
        if (self.label_field is not None or self.tags_field is not None) != (self.labels is not None):
            raise ValueError("LocalSource.labels goes with label_field (classification) or tags_field (token "
                             "labeling): set labels with one of them, or none of them")

    def _check_conll(self) -> None:
        if len(self.conll_columns) != 2 or not all(isinstance(c, int) for c in self.conll_columns):
            raise ValueError(f"LocalSource.conll_columns={self.conll_columns!r}: give two column indices "
                             "(word, tag), e.g. (0, -1)")
        if self.labels is None:
            raise ValueError("LocalSource.labels is needed for kind='conll': list every tag")

    @property
    def has_pairs(self) -> bool:
        return (self.kind == "tsv" and len(self.text_columns) == 2) or (
            self.kind == "jsonl" and self.text_b_field is not None)

    @property
    def has_labels(self) -> bool:
        """Records carry a "label" (classification)."""
        return (self.kind == "tsv" and self.labels is not None) or (
            self.kind == "jsonl" and self.label_field is not None)

    @property
    def has_words(self) -> bool:
        """Records carry "words" and "word_labels" (token labeling)."""
        return self.kind == "conll" or (self.kind == "jsonl" and self.tags_field is not None)

    def options(self) -> dict[str, Any]:
        """The options that matter for this kind (for the fingerprint)."""
        out: dict[str, Any] = {"kind": self.kind}
        if self.kind == "text":
            out["split_by"] = self.split_by
        elif self.kind == "jsonl":
            out.update(text_field=self.text_field, label_field=self.label_field, text_b_field=self.text_b_field,
                       words_field=self.words_field, tags_field=self.tags_field,
                       labels=None if self.labels is None else list(self.labels))
        elif self.kind == "conll":
            out.update(conll_columns=list(self.conll_columns), labels=list(self.labels))
        else:
            out.update(
                text_columns=[str(c) for c in self.text_columns],
                label_column=None if self.label_column is None else str(self.label_column),
                labels=None if self.labels is None else list(self.labels),
                has_header=self.has_header,
                delimiter=self.delimiter,
            )
        return out


def _no_check() -> None:
    pass


# ----------------------------------------------------------------------------------------------------
# Files and fingerprints


def expand_paths(paths: Sequence[str]) -> list[str]:
    """Absolute paths of the files named by `paths` (files or globs), deduplicated and sorted."""
    files: set[str] = set()
    for pattern in paths:
        pattern = os.path.expanduser(str(pattern))
        if glob.has_magic(pattern):
            matches = [m for m in glob.glob(pattern, recursive=True) if os.path.isfile(m)]
            if not matches:
                raise ValueError(f"{pattern}: the glob matches no file (working directory {os.getcwd()})")
            files.update(os.path.abspath(m) for m in matches)
        elif os.path.isfile(pattern):
            files.add(os.path.abspath(pattern))
        elif os.path.isdir(pattern):
            raise ValueError(f"{pattern}: is a directory, not a file; name its files, e.g. with a glob such as "
                             f"{os.path.join(pattern, '*.txt')}")
        else:
            raise ValueError(f"{pattern}: no such file (working directory {os.getcwd()})")
    return sorted(files)


def _file_fingerprint(path: str) -> dict[str, Any]:
    stat = os.stat(path)
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
    return {"path": path, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha.hexdigest()}


def fingerprint(splits: Mapping[str, LocalSource], *, skip_bad_records: bool = False) -> str:
    """16 hex digits over the files (path, size, mtime, sha256), the options and the format version."""
    description = {
        "format_version": FORMAT_VERSION,
        "skip_bad_records": bool(skip_bad_records),
        "splits": {
            split: {"options": source.options(), "files": [_file_fingerprint(p) for p in expand_paths(source.paths)]}
            for split, source in sorted(splits.items())
        },
    }
    blob = json.dumps(description, sort_keys=True).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------
# Parsing: each parser yields ("ok", record) or ("bad", "FILE:LINE: reason")


class _Records:
    """Yields the records of one source; bad records raise or are counted (skip_bad_records)."""

    def __init__(self, source: LocalSource, skip_bad_records: bool):
        self.source = source
        self.skip = skip_bad_records
        self.skipped = 0
        self.reasons: list[str] = []

    def bad(self, path: str, line: int, reason: str) -> None:
        message = f"{path}:{line}: {reason}"
        if not self.skip:
            raise ValueError(message)
        self.skipped += 1
        if len(self.reasons) < MAX_REASONS:
            self.reasons.append(message)
        logger.warning("skipping bad record: %s", message)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        parse = {"text": self._text, "jsonl": self._jsonl, "tsv": self._tsv, "conll": self._conll}[self.source.kind]
        for path in expand_paths(self.source.paths):
            with open(path, "rb") as f:
                data = f.read()
            if not data.strip():
                self.bad(path, 1, "the file is empty" if not data else "the file is empty (only whitespace)")
                continue
            yield from parse(path, data)

    def _decode(self, path: str, chunk: bytes, line: int, offset: int) -> str | None:
        """`chunk` (starting at 1-based `line`, byte `offset` of the file) as UTF-8, or None if invalid."""
        try:
            return chunk.decode("utf-8")
        except UnicodeDecodeError as e:
            bad_line = line + chunk.count(b"\n", 0, e.start)
            self.bad(path, bad_line, f"invalid UTF-8 at byte offset {offset + e.start} ({e.reason})")
            return None

    @staticmethod
    def _lines(data: bytes) -> Iterator[tuple[int, int, bytes]]:
        """(1-based line number, byte offset, line without its end-of-line) of `data`."""
        offset = 0
        for number, raw in enumerate(data.splitlines(keepends=True), start=1):
            # bytes.splitlines also splits on \r alone; UTF-8 text never has those inside a character
            yield number, offset, raw.rstrip(b"\r\n")
            offset += len(raw)

    def _text(self, path: str, data: bytes) -> Iterator[dict[str, Any]]:
        mode = self.source.split_by
        if mode == "file":
            text = self._decode(path, data, 1, 0)
            if text is not None:
                yield {"text": text}
            return
        if mode == "line":
            for number, offset, raw in self._lines(data):
                if raw.strip():
                    text = self._decode(path, raw, number, offset)
                    if text is not None:
                        yield {"text": text}
            return
        # blank_line: paragraphs of consecutive non-blank lines
        paragraph: list[tuple[int, int, bytes]] = []
        for number, offset, raw in [*self._lines(data), (0, 0, b"")]:
            if raw.strip():
                paragraph.append((number, offset, raw))
                continue
            if paragraph:
                first_line, first_offset, _ = paragraph[0]
                chunk = b"\n".join(r for _, _, r in paragraph)
                # offsets inside the joined chunk are off by any "\r" dropped; recompute per line on error
                try:
                    text = chunk.decode("utf-8")
                except UnicodeDecodeError:
                    text = None
                    for line_number, line_offset, raw_line in paragraph:
                        if self._decode(path, raw_line, line_number, line_offset) is None:
                            break
                if text is not None:
                    yield {"text": text}
                paragraph = []

    def _jsonl(self, path: str, data: bytes) -> Iterator[dict[str, Any]]:
        to_record = self._jsonl_words if self.source.has_words else self._jsonl_texts
        for number, offset, raw in self._lines(data):
            if not raw.strip():
                continue
            line = self._decode(path, raw, number, offset)
            if line is None:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                self.bad(path, number, f"not valid JSON ({e.msg} at column {e.colno})")
                continue
            record = to_record(obj) if isinstance(obj, dict) else f"expected a JSON object, got {type(obj).__name__}"
            if isinstance(record, str):
                self.bad(path, number, record)
            else:
                yield record

    @staticmethod
    def _field(obj: dict[str, Any], field: str, types: type | tuple[type, ...], what: str) -> tuple[Any, str | None]:
        """(obj[field], None), or (None, the reason it is missing or of the wrong type)."""
        if field not in obj:
            return None, f"the JSON object lacks the field {field!r} (it has {sorted(obj)[:10]})"
        value = obj[field]
        if not isinstance(value, types) or isinstance(value, bool):
            return None, f"the field {field!r} is {type(value).__name__}, not {what}"
        return value, None

    def _label_index(self, value: Any, what: str) -> tuple[int | None, str | None]:
        """The index of str(value) in the labels, or (None, why not)."""
        labels = self.source.labels or ()
        if str(value) not in labels:
            return None, f"{what} {str(value)!r} is not one of {list(labels)} (data.labels)"
        return labels.index(str(value)), None

    def _jsonl_texts(self, obj: dict[str, Any]) -> dict[str, Any] | str:
        """A text record (with "text_b" and "label" when asked for), or the reason the object is bad."""
        source = self.source
        text, why = self._field(obj, source.text_field, str, "a string")
        if why:
            return why
        record: dict[str, Any] = {"text": text}
        if source.text_b_field is not None:
            record["text_b"], why = self._field(obj, source.text_b_field, str, "a string")
            if why:
                return why
        if source.label_field is not None:
            value, why = self._field(obj, source.label_field, (str, int), "a string or an int")
            if why:
                return why
            record["label"], why = self._label_index(value, "label")
            if why:
                return why
        return record

    def _jsonl_words(self, obj: dict[str, Any]) -> dict[str, Any] | str:
        """A token-labeling record, or the reason the object is bad."""
        source = self.source
        words, why = self._field(obj, source.words_field, list, "a list of words")
        if why:
            return why
        tags, why = self._field(obj, source.tags_field, list, "a list of tags")
        if why:
            return why
        if len(words) != len(tags):
            return (f"{len(words)} words ({source.words_field!r}) but {len(tags)} tags ({source.tags_field!r}): "
                    "give one tag per word")
        if not words:
            return f"the field {source.words_field!r} is an empty list"
        if not all(isinstance(w, str) for w in words):
            return f"the field {source.words_field!r} holds non-strings: give a list of words"
        word_labels = []
        for tag in tags:
            if not isinstance(tag, (str, int)):
                return f"tag {tag!r} in {source.tags_field!r} is not a string or an int"
            index, why = self._label_index(tag, "tag")
            if why:
                return why
            word_labels.append(index)
        return {"text": " ".join(words), "words": words, "word_labels": word_labels}

    def _column_index(self, path: str, column: str | int, header: list[str] | None) -> int:
        if header is not None and column in header:
            return header.index(column)
        if isinstance(column, int) or (isinstance(column, str) and column.isdigit()):
            return int(column)
        where = f"the header {header!r}" if header is not None else "a file without header (use 0-based indices)"
        raise ValueError(f"{path}:1: column {column!r} is not in {where}")

    def _tsv(self, path: str, data: bytes) -> Iterator[dict[str, Any]]:
        source = self.source
        lines = self._lines(data)
        header = None
        expected = None
        if source.has_header:
            for number, offset, raw in lines:
                if not raw.strip():
                    continue
                text = self._decode(path, raw, number, offset)
                if text is None:  # skip policy: without a header the file cannot be read
                    return
                header = text.split(source.delimiter)
                expected = len(header)
                break
        text_idx = [self._column_index(path, c, header) for c in source.text_columns]
        label_idx = None if source.label_column is None else self._column_index(path, source.label_column, header)
        needed = max(text_idx + ([label_idx] if label_idx is not None else [])) + 1
        if expected is not None and needed > expected:
            raise ValueError(f"{path}:1: the header has {expected} columns, the columns asked for need {needed}")
        label_ids = {label: i for i, label in enumerate(source.labels or ())}
        rows = 0
        skipped_before = self.skipped
        for number, offset, raw in lines:
            if not raw.strip():
                continue
            line = self._decode(path, raw, number, offset)
            if line is None:
                continue
            cells = line.split(source.delimiter)
            if expected is None:  # no header: the first row sets the column count
                expected = len(cells)
                if needed > expected:
                    self.bad(path, number, f"{len(cells)} columns, the columns asked for need {needed}")
                    expected = None
                    continue
            if len(cells) != expected:
                self.bad(path, number, f"{len(cells)} columns, expected {expected}")
                continue
            record: dict[str, Any] = {"text": cells[text_idx[0]]}
            if len(text_idx) == 2:
                record["text_b"] = cells[text_idx[1]]
            if label_idx is not None:
                label = cells[label_idx]
                if label not in label_ids:
                    self.bad(path, number, f"unknown label {label!r} (allowed: {list(source.labels)})")
                    continue
                record["label"] = label_ids[label]
            rows += 1
            yield record
        if rows == 0 and self.skipped == skipped_before:
            self.bad(path, 1, "the file has a header but no rows" if header is not None else "the file has no rows")


    def _conll(self, path: str, data: bytes) -> Iterator[dict[str, Any]]:
        """Sentences of a CoNLL column file; a bad line skips (or fails) its whole sentence."""
        sentences = 0
        skipped_before = self.skipped
        words: list[str] = []
        tags: list[int] = []
        bad = False
        for number, offset, raw in [*self._lines(data), (0, 0, b"")]:
            if not raw.strip() or raw.startswith(b"-DOCSTART-"):  # the end of a sentence
                if words and not bad:
                    sentences += 1
                    yield {"text": " ".join(words), "words": words, "word_labels": tags}
                words, tags, bad = [], [], False
                continue
            if bad or (not words and raw.split(None, 1)[0] == b"#"):  # a comment: "# sent_id = 1"
                continue
            line = self._decode(path, raw, number, offset)
            token = None if line is None else self._conll_token(path, number, line)
            if token is None:
                bad = True
                continue
            words.append(token[0])
            tags.append(token[1])
        if sentences == 0 and self.skipped == skipped_before:
            self.bad(path, 1, "the file has no sentences (token lines separated by blank lines)")

    def _conll_token(self, path: str, number: int, line: str) -> tuple[str, int] | None:
        """(word, tag index) of one token line, or None (reported) when the line is bad."""
        cells = line.split()
        word_column, tag_column = self.source.conll_columns
        if not all(-len(cells) <= c < len(cells) for c in (word_column, tag_column)):
            self.bad(path, number, f"{len(cells)} columns, data.conll_columns={list(self.source.conll_columns)} "
                                   "asks for more")
            return None
        index, why = self._label_index(cells[tag_column], "tag")
        if why:
            self.bad(path, number, why)
            return None
        return cells[word_column], index


# ----------------------------------------------------------------------------------------------------
# The TFDS builder


def _features(source: LocalSource):
    import tensorflow_datasets as tfds

    features: dict[str, Any] = {"text": tfds.features.Text()}
    if source.has_pairs:
        features["text_b"] = tfds.features.Text()
    if source.has_labels:
        features["label"] = tfds.features.ClassLabel(names=list(source.labels))
    if source.has_words:
        features["words"] = tfds.features.Sequence(tfds.features.Text())
        features["word_labels"] = tfds.features.Sequence(tfds.features.ClassLabel(names=list(source.labels)))
    return tfds.features.FeaturesDict(features)


def _builder_class():
    """The builder class, made on first use so that importing this module does not import tfds."""
    global _BUILDER_CLASS
    if _BUILDER_CLASS is not None:
        return _BUILDER_CLASS
    import tensorflow_datasets as tfds

    class LocalTextSource(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """Records of local text files (see `llm_jax.data.tfds_sources`)."""

        VERSION = tfds.core.Version("1.0.0")
        # No code file next to checksums: TFDS would locate this module through `importlib_resources`,
        # which is not installed (and there is nothing to download).
        code_path = None

        def __init__(self, *, splits: Mapping[str, LocalSource], skip_bad_records: bool, **kwargs):
            self._local_splits = dict(splits)
            self._skip_bad_records = skip_bad_records
            super().__init__(**kwargs)

        def _log_download_bytes(self) -> None:  # TFDS prints these to stdout; `prepare` logs instead
            pass

        def _log_download_done(self) -> None:
            pass

        def _info(self):
            first = next(iter(self._local_splits.values()))
            return tfds.core.DatasetInfo(
                builder=self,
                description="Local text records prepared by llm_jax.data.tfds_sources.",
                features=_features(first),
                disable_shuffling=True,  # keep file and line order
                metadata=tfds.core.MetadataDict(),
            )

        def _split_generators(self, dl_manager):
            del dl_manager
            self.info.metadata.update(
                {
                    "skip_bad_records": self._skip_bad_records,
                    "skipped_records": 0,
                    "skipped_by_split": {},
                    "reasons": [],
                }
            )
            return {split: self._generate_examples(split) for split in self._local_splits}

        def _generate_examples(self, split: str):
            records = _Records(self._local_splits[split], self._skip_bad_records)
            count = 0
            for count, record in enumerate(records, start=1):
                yield count, record  # int keys: with shuffling disabled, TFDS writes them in key order
            if count == 0:
                files = expand_paths(self._local_splits[split].paths)
                raise ValueError(
                    f"split {split!r}: no records in {', '.join(files)}"
                    + (f" ({records.skipped} bad records skipped: {records.reasons[:3]})" if records.skipped else "")
                )
            meta = self.info.metadata
            meta["skipped_records"] += records.skipped
            meta["skipped_by_split"][split] = records.skipped
            meta["reasons"] = (meta["reasons"] + records.reasons)[:MAX_REASONS]
            if records.skipped:
                logger.warning("%s split %r: skipped %d bad records", self.info.full_name, split, records.skipped)

    _BUILDER_CLASS = LocalTextSource
    return LocalTextSource


_BUILDER_CLASS = None


def _check_splits(source: LocalSource | None, splits: Mapping[str, LocalSource] | None) -> dict[str, LocalSource]:
    out: dict[str, LocalSource] = {}
    if source is not None:
        out["train"] = source
    for split, split_source in (splits or {}).items():
        if split in out:
            raise ValueError(f"split {split!r} is given twice: as `source` (the train split) and in `splits`")
        out[split] = split_source
    if not out:
        raise ValueError("prepare: give a source, or splits")
    def schema(s: LocalSource) -> tuple:
        return s.has_pairs, s.has_labels, s.has_words, s.labels

    first_name, first = next(iter(out.items()))
    for split, split_source in out.items():
        if not isinstance(split_source, LocalSource):
            raise TypeError(f"split {split!r}: expected a LocalSource, got {type(split_source).__name__}")
        if schema(split_source) != schema(first):
            raise ValueError(
                f"split {split!r} and split {first_name!r} give different record fields or labels: all splits of"
                " a dataset share one schema"
            )
    return out


@contextlib.contextmanager
def quiet_progress():
    """No TFDS progress bars while preparing (`tfds.display_progress_bar` is global: restore it after)."""
    from tensorflow_datasets.core.utils import tqdm_utils

    before = getattr(tqdm_utils, "_active", True)
    tqdm_utils.display_progress_bar(False)
    try:
        yield
    finally:
        tqdm_utils.display_progress_bar(before)


def prepare(
    source: LocalSource | None,
    data_dir: str,
    *,
    splits: Mapping[str, LocalSource] | None = None,
    name: str,
    skip_bad_records: bool = False,
):
    """Prepares (once) the dataset `name` from `source` (the "train" split) and `splits`; returns the builder.

    The dataset lies under `data_dir/name/<fingerprint>/`; an unchanged source reuses it without
    rewriting anything, a changed one is prepared into a new fingerprint directory.  The number of
    skipped bad records (`skip_bad_records=True`) is logged and kept in `builder.info.metadata`.
    """
    if not name or os.sep in name or name.startswith("."):
        raise ValueError(f"name={name!r}: give a plain directory name")
    all_splits = _check_splits(source, splits)
    fp = fingerprint(all_splits, skip_bad_records=skip_bad_records)
    name_dir = os.path.join(data_dir, name)
    created = _missing_dirs(name_dir)
    with exclusive_lock(os.path.join(name_dir, LOCK_FILE)):
        existed = os.path.exists(os.path.join(name_dir, fp))
        try:
            return _prepare_locked(all_splits, data_dir, name, fp, skip_bad_records)
        except BaseException:
            _remove_failed(name_dir, None if existed else fp, created)
            raise


def _missing_dirs(path: str) -> list[str]:
    """`path` and its ancestors that do not exist yet, deepest first: what preparing there would create."""
    missing = []
    path = os.path.abspath(path)
    while not os.path.exists(path):
        missing.append(path)
        path = os.path.dirname(path)
    return missing


def _remove_failed(name_dir: str, fp: str | None, created: Sequence[str]) -> None:
    """After a failed prepare (under its lock): removes the fingerprint directory `fp` it started, and the
    directories in `created` (deepest first) that hold nothing else, so no partial dataset is left behind."""
    if fp is not None:
        shutil.rmtree(os.path.join(name_dir, fp), ignore_errors=True)
    lock = os.path.join(name_dir, LOCK_FILE)
    with contextlib.suppress(OSError):  # cleaning up must not hide the error that failed the prepare
        if created and os.path.abspath(name_dir) == created[0] and os.listdir(name_dir) == [LOCK_FILE]:
            os.remove(lock)  # a process waiting on it sees it gone and locks a new one (`exclusive_lock`)
    for directory in created:
        try:
            os.rmdir(directory)  # only when empty
        except OSError:
            break


@contextlib.contextmanager
def exclusive_lock(path: str) -> Iterator[None]:
    """An exclusive `fcntl.flock` on `path` (created with its directory) for the block: one process at a time
    (local processes of one job, or parallel runs) prepares a dataset; the others wait, then find it prepared.
    A failed prepare may remove the lock file it held: a waiter that then holds a removed file locks anew."""
    import fcntl

    while True:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            lock_file = open(path, "a")
        except FileNotFoundError:  # its directory was removed in between: create it again
            continue
        with lock_file:
            logger.debug("waiting for %s", path)
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                if _same_file(path, lock_file.fileno()):
                    yield
                    return
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)


def _same_file(path: str, fd: int) -> bool:
    """Whether `path` still names the open file `fd` (not removed, not replaced)."""
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return False
    return os.path.samestat(stat, os.fstat(fd))


def _prepare_locked(all_splits: dict[str, LocalSource], data_dir: str, name: str, fp: str, skip_bad_records: bool):
    root = os.path.join(data_dir, name, fp)
    builder = _builder_class()(
        splits=all_splits, skip_bad_records=skip_bad_records, data_dir=root, file_format="array_record"
    )
    import tensorflow_datasets as tfds

    # TFDS renames its incomplete.* directory into place only once every split is written
    reused = os.path.exists(os.path.join(os.fspath(builder.data_path), "dataset_info.json"))
    if not reused:
        with quiet_progress():
            mode = tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
            builder.download_and_prepare(download_config=tfds.download.DownloadConfig(download_mode=mode))
        # the records are written: re-read the info so that the metadata reflects what is on disk
        builder = _builder_class()(
            splits=all_splits, skip_bad_records=skip_bad_records, data_dir=root, file_format="array_record"
        )
    # relative to latest.json's directory, not to the working directory: it resolves from anywhere
    relative = os.path.relpath(os.fspath(builder.data_path), os.path.join(data_dir, name))
    _write_json(os.path.join(data_dir, name, LATEST_FILE), {"fingerprint": fp, "builder_dir": relative})
    skipped = skipped_records(builder)
    logger.info(
        "%s dataset %r at %s (%s; skipped %d bad records)",
        "reused" if reused else "prepared",
        name,
        builder.data_path,
        ", ".join(f"{s}: {builder.info.splits[s].num_examples}" for s in all_splits),
        skipped,
    )
    return builder


def skipped_records(builder) -> int:
    """Bad records skipped while preparing `builder`'s dataset (0 unless `skip_bad_records=True`)."""
    metadata = builder.info.metadata or {}
    return int(metadata.get("skipped_records", 0))


def _write_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


class DecodedDataSource:
    """A TFDS array_record data source whose records come back as `str` texts and `int` labels."""

    def __init__(self, source):
        self._source = source

    def __len__(self) -> int:
        return len(self._source)

    @classmethod
    def _plain(cls, value: Any) -> Any:
        """bytes -> str, numpy scalars -> int/float, sequences and arrays -> lists of those."""
        if isinstance(value, bytes):
            return value.decode("utf-8")
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            return [cls._plain(v) for v in value.tolist()]
        if isinstance(value, (list, tuple)):
            return [cls._plain(v) for v in value]
        return value

    @classmethod
    def _decode(cls, record: Mapping[str, Any]) -> dict[str, Any]:
        return {key: cls._plain(value) for key, value in record.items()}

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} records")
        return self._decode(self._source[index])

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        return [self._decode(r) for r in self._source.__getitems__([int(i) for i in indices])]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return f"DecodedDataSource({self._source!r})"


def builder_dir(data_dir: str, name: str) -> str:
    """The TFDS builder directory (absolute) of the latest `prepare(..., name=name)` under `data_dir`."""
    latest = os.path.join(data_dir, name, LATEST_FILE)
    if not os.path.exists(latest):
        raise FileNotFoundError(f"{latest}: dataset {name!r} was never prepared under {data_dir} (call prepare first)")
    with open(latest, encoding="utf-8") as f:
        recorded = json.load(f)["builder_dir"]
    path = os.path.join(os.path.dirname(latest), recorded)  # an absolute `recorded` stays as it is
    if not os.path.exists(os.path.join(path, "dataset_info.json")) and os.path.exists(
        os.path.join(recorded, "dataset_info.json")
    ):
        path = recorded  # written by an older version, relative to the working directory of its prepare
    if not os.path.exists(os.path.join(path, "dataset_info.json")):
        raise FileNotFoundError(f"{path}: the prepared dataset named by {latest} is gone; prepare it again")
    return os.path.abspath(path)


def data_source(data_dir: str, name: str, split: str) -> DecodedDataSource:
    """Random-access records (`len()`, `[i]`) of `split` of the dataset `name` prepared under `data_dir`."""
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(builder_dir(data_dir, name))
    if split not in builder.info.splits:
        raise ValueError(f"dataset {name!r} has no split {split!r} (it has {sorted(builder.info.splits)})")
    return DecodedDataSource(builder.as_data_source(split=split))
