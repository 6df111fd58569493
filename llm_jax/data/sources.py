"""Document sources, selected by `data.source`: each gives the records of every split it has.

A record is a dict with "text", plus "text_b" (sentence pairs) and "label" (an index into data.labels)
for classification files (TSV, or JSONL with data.label_field / data.text_b_field), and "words" (list[str])
with "word_labels" (list[int], indices into data.labels) for token labeling (data.source=conll, or JSONL
when data.labels is set and data.label_field is empty); `SourceSplits.text_of` is always the text, the tasks
read the other fields directly. Local files and the embedded Python documentation are prepared once as
TFDS array_record datasets under `data.tfds_data_dir` (`llm_jax.data.tfds_sources`); catalog datasets are
read from there with `tfds.data_source` (`llm_jax.data.tfds_catalog`). Reading never needs TensorFlow.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
from typing import Any, Callable, Mapping, Sequence, TYPE_CHECKING

import ml_collections

from llm_jax.errors import ConfigError
from llm_jax.registry import Registry

if TYPE_CHECKING:
    from llm_jax.data.tfds_sources import LocalSource

Record = dict[str, Any]
TEST_SPLIT = "test"  # the split data.test_path is read as (evaluate --split=test)
RecordSource = Sequence[Record]  # random access: len() and [i]


@dataclasses.dataclass(frozen=True)
class SourceSplits:
    """The records of each split a source has, how to get a record's text, and the records skipped as bad."""

    splits: dict[str, RecordSource]
    text_of: Callable[[Record], str]
    skipped_records: int = 0


SOURCES: Registry[Callable[[ml_collections.ConfigDict], SourceSplits]] = Registry("data source")


def tfds_data_dir(data: ml_collections.ConfigDict) -> str:
    """data.tfds_data_dir, else $TFDS_DATA_DIR, else ~/tensorflow_datasets (TFDS's own default)."""
    directory = data.tfds_data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    return os.path.abspath(os.path.expanduser(directory))


def local_record_text(record: Record) -> str:
    """A local record's text; a sentence pair is the two texts on two lines."""
    if "text_b" in record:
        return record["text"] + "\n" + record["text_b"]
    return record["text"]


def _paths(value: str, key: str) -> tuple[str, ...]:
    paths = tuple(part.strip() for part in value.split(",") if part.strip())
    if not paths:
        raise ConfigError(f"{key} is empty: give the file(s) to read, e.g. --config.{key}=FILE (globs and "
                          "comma-separated lists work)")
    return paths


def _files(data: ml_collections.ConfigDict, key: str) -> tuple[str, ...]:
    """The paths of data.KEY, checked to name existing files (globs must match one): a ConfigError naming the
    key and the path otherwise, before anything is prepared."""
    from llm_jax.data.tfds_sources import expand_paths

    paths = _paths(data[key], f"data.{key}")
    try:
        expand_paths(paths)
    except ValueError as error:
        raise ConfigError(f"data.{key}={data[key]!r}: {error}") from None
    return paths


def _local_source(data: ml_collections.ConfigDict, make_source: Callable[[tuple[str, ...]], Any],
                  paths: tuple[str, ...]) -> Any:
    """make_source(paths); its option checks (LocalSource fields are named like the data keys) become a
    ConfigError naming the data key."""
    try:
        return make_source(paths)
    except ConfigError:
        raise
    except ValueError as error:
        raise ConfigError(f"data.source={data.source!r}: {str(error).replace('LocalSource.', 'data.')}") from None


def _dataset_name(source: str, paths: Sequence[str]) -> str:
    stem = os.path.splitext(os.path.basename(paths[0]))[0]
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{source}_{stem}").strip("._") or source


def prepare_local(data: ml_collections.ConfigDict, make_source: Callable[[tuple[str, ...]], Any],
                  name: str | None = None) -> SourceSplits:
    """Prepares data.path (and data.eval_path as data.eval_split) once and returns their records."""
    from llm_jax.data import tfds_sources

    splits = {data.train_split: _local_source(data, make_source, _files(data, "path"))}
    if data.eval_path:
        if data.eval_split == data.train_split:
            raise ConfigError(f"data.eval_split={data.eval_split!r} is also data.train_split: name them differently")
        splits[data.eval_split] = _local_source(data, make_source, _files(data, "eval_path"))
    if data.test_path:
        if TEST_SPLIT in (data.train_split, data.eval_split):
            raise ConfigError(f"data.test_path is read as the split {TEST_SPLIT!r}, which is also data.train_split or "
                              "data.eval_split: name those differently")
        splits[TEST_SPLIT] = _local_source(data, make_source, _files(data, "test_path"))
    name = name or _dataset_name(data.source, splits[data.train_split].paths)
    try:
        builder = tfds_sources.prepare(None, tfds_data_dir(data), splits=splits, name=name,
                                       skip_bad_records=data.skip_bad_records)
    except ConfigError:
        raise
    except ValueError as error:  # FILE:LINE: what is wrong with a record
        raise ConfigError(f"{error} (data.source={data.source!r}; fix the file, or set data.skip_bad_records=True "
                          "to skip bad records and count them)") from error
    import tensorflow_datasets as tfds

    # a read-only builder of the prepared files pickles (into Grain workers) by its directory
    reader = tfds.builder_from_directory(os.fspath(builder.data_path))
    records = {split: tfds_sources.DecodedDataSource(reader.as_data_source(split=split)) for split in splits}
    return SourceSplits(records, local_record_text, tfds_sources.skipped_records(builder))


@SOURCES.register("text_file")
def text_files(data: ml_collections.ConfigDict) -> SourceSplits:
    """UTF-8 text files at data.path, cut into documents by data.split_by (file, blank_line or line)."""
    from llm_jax.data.tfds_sources import LocalSource

    return prepare_local(data, lambda paths: LocalSource("text", paths, split_by=data.split_by))


def _labels(data: ml_collections.ConfigDict, why: str) -> tuple[str, ...]:
    """data.labels as distinct strings; a ConfigError saying what needs them when there are none."""
    labels = tuple(str(label) for label in data.labels)
    if not labels:
        raise ConfigError(f"data.labels is empty: {why} needs the list of allowed labels, "
                          "e.g. --config.data.labels='(\"O\", \"B-PER\", \"I-PER\")'")
    if len(set(labels)) != len(labels):
        raise ConfigError(f"data.labels={labels!r} repeats a label: give each label once")
    return labels


def _jsonl_source(data: ml_collections.ConfigDict, paths: tuple[str, ...]) -> LocalSource:
    """The JSONL LocalSource the config asks for: classification when data.label_field is set, token labeling
    when data.labels is set without data.label_field, else plain text (optionally pairs)."""
    from llm_jax.data.tfds_sources import LocalSource

    text_field, text_b_field = data.text_field or "text", data.text_b_field or None
    if data.label_field:
        return LocalSource("jsonl", paths, text_field=text_field, text_b_field=text_b_field,
                           label_field=data.label_field, labels=_labels(data, "data.label_field"))
    if not data.labels:
        return LocalSource("jsonl", paths, text_field=text_field, text_b_field=text_b_field)
    if text_b_field or not data.words_field or not data.tags_field:
        raise ConfigError("data.labels without data.label_field makes data.source=jsonl a token-labeling source: "
                          "it needs data.words_field and data.tags_field and no data.text_b_field (set "
                          "data.label_field for sentence classification)")
    return LocalSource("jsonl", paths, words_field=data.words_field, tags_field=data.tags_field,
                       labels=_labels(data, "token labeling"))


@SOURCES.register("jsonl")
def jsonl_files(data: ml_collections.ConfigDict) -> SourceSplits:
    """JSON-lines files at data.path: each object's data.text_field (default "text") is one document; with
    data.label_field (and data.labels) also a "label", with data.text_b_field a "text_b"; with data.labels
    but no data.label_field, token labeling: data.words_field and data.tags_field give "words" and
    "word_labels" (and "text" is the words joined by spaces)."""
    return prepare_local(data, lambda paths: _jsonl_source(data, paths))


@SOURCES.register("tsv")
def tsv_files(data: ml_collections.ConfigDict) -> SourceSplits:
    """Tab-separated files at data.path: data.text_columns (one, or two for pairs), optional labels."""
    from llm_jax.data.tfds_sources import LocalSource

    def make(paths: tuple[str, ...]) -> LocalSource:
        return LocalSource("tsv", paths, text_columns=tuple(data.text_columns),
                           label_column=data.label_column or None, labels=tuple(data.labels) or None,
                           has_header=data.has_header)

    return prepare_local(data, make)


@SOURCES.register("conll")
def conll_files(data: ml_collections.ConfigDict) -> SourceSplits:
    """CoNLL-style column files at data.path for token labeling: one token per line, whitespace-separated
    columns, data.conll_columns = (word, tag) indices, every tag one of data.labels, a blank line after
    each sentence; "-DOCSTART-" lines and comment lines before a sentence (first column "#") are skipped. Records:
    {"words", "word_labels", "text" (the words joined by spaces)}."""
    from llm_jax.data.tfds_sources import LocalSource

    columns = tuple(data.conll_columns)
    if len(columns) != 2 or not all(isinstance(c, int) and not isinstance(c, bool) for c in columns):
        raise ConfigError(f"data.conll_columns={columns!r}: give the (word, tag) column indices as two ints, "
                          "e.g. (0, -1); negative ones count from the end of the line")
    labels = _labels(data, "data.source=conll")
    return prepare_local(data, lambda paths: LocalSource("conll", paths, conll_columns=columns, labels=labels))


@SOURCES.register("punctuation")
def punctuation_restoration(data: ml_collections.ConfigDict) -> SourceSplits:
    """Token labelling derived from the text files at data.path / eval_path / test_path: each word tagged with
    the punctuation mark that follows it (`llm_jax.data.punctuation`), written once as CoNLL under the data
    directory and read like data.source=conll; data.labels must be punctuation.PUNCTUATION_LABELS."""
    from llm_jax.data import punctuation

    if tuple(data.labels) != punctuation.PUNCTUATION_LABELS:
        raise ConfigError(f"data.source=punctuation tags words with {punctuation.PUNCTUATION_LABELS}: set data.labels "
                          f"to that tuple (got {tuple(data.labels)})")
    from llm_jax.data.tfds_sources import expand_paths

    directory = os.path.join(tfds_data_dir(data), "punctuation_source")
    local = data.copy_and_resolve_references()
    for key in ("path", "eval_path", "test_path"):
        if data[key]:
            files = expand_paths(_files(data, key))
            try:
                derived = [punctuation.derive_conll(path, directory) for path in files]
            except ValueError as error:  # the text cannot be read or has no words: name the file and key
                raise ConfigError(f"data.{key}: {error}") from None
            local[key] = ",".join(derived)
    local.conll_columns = (0, 1)
    return conll_files(local)


def python_docs_topics() -> list[str]:
    """The topic pages of Python's own help system (`pydoc_data.topics`), shipped with every CPython."""
    from pydoc_data import topics

    return [topics.topics[name].strip() for name in sorted(topics.topics)]


def write_generated_jsonl(directory: str, stem: str, lines: Sequence[str]) -> str:
    """`lines` as DIRECTORY/STEM-<hash of the content>.jsonl, written once (atomically): a generated source file
    that changes name when its content changes, so the prepared dataset's fingerprint follows it."""
    content = "".join(lines).encode("utf-8")
    path = os.path.join(directory, f"{stem}-{hashlib.sha256(content).hexdigest()[:16]}.jsonl")
    if not os.path.exists(path):
        os.makedirs(directory, exist_ok=True)
        with open(f"{path}.{os.getpid()}.tmp", "wb") as f:
            f.write(content)
        os.replace(f"{path}.{os.getpid()}.tmp", path)
    return path


@SOURCES.register("python_docs")
def python_docs(data: ml_collections.ConfigDict) -> SourceSplits:
    """Python's help topics, one document each (about 470 KB of prose and code), so the default experiment
    runs offline with no data file. Written once as JSONL under the data directory, then prepared like a file."""
    from llm_jax.data.tfds_sources import LocalSource

    lines = [json.dumps({"text": topic}) + "\n" for topic in python_docs_topics()]
    path = write_generated_jsonl(os.path.join(tfds_data_dir(data), "python_docs_source"), "topics", lines)
    local = data.copy_and_resolve_references()
    local.path, local.eval_path = path, ""
    return prepare_local(local, lambda paths: LocalSource("jsonl", paths), name="python_docs")


@SOURCES.register("tfds")
def tfds_catalog_dataset(data: ml_collections.ConfigDict) -> SourceSplits:
    """A TFDS catalog dataset (data.tfds_name) read from data.tfds_data_dir, prepared there when it can be."""
    from llm_jax.data import tfds_catalog

    if not data.tfds_name:
        raise ConfigError("data.tfds_name is empty: name the TFDS dataset for data.source=tfds, "
                          "e.g. --config.data.tfds_name=lm1b or glue/sst2")
    splits = {data.train_split: None, data.eval_split: None}
    records = {}
    for split in splits:
        try:
            records[split] = tfds_catalog.catalog_source(data.tfds_name, split, tfds_data_dir(data))
        except tfds_catalog.CatalogError as error:
            if isinstance(error, tfds_catalog.UnknownSplitError) and split == data.eval_split != data.train_split:
                continue  # no evaluation split: the pipeline holds out part of the train split
            raise ConfigError(f"data.tfds_name={data.tfds_name!r}: {error}") from error
    return SourceSplits(records, functools.partial(tfds_catalog.text_of, text_field=data.text_field or None))


def source_splits(data: ml_collections.ConfigDict, overrides: Mapping[str, Any] | None = None) -> SourceSplits:
    """The records of data.source, optionally with some source keys replaced (a mixture component)."""
    if overrides:
        data = data.copy_and_resolve_references()
        for key, value in overrides.items():
            if key != "weight":
                data[key] = tuple(value) if isinstance(data[key], tuple) else value
    return SOURCES.get(data.source)(data)


# the pair sources (pairs_jsonl, pairs_tsv, python_docs_qa) register themselves in SOURCES
from llm_jax.data import pairs as _pairs  # noqa: E402,F401
