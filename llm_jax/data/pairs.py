"""Text pairs: a text in and the text it should give out (SFT's prompt -> response, seq2seq's source -> target).

A pair record is `{"inputs": str, "targets": str}` (the keys `INPUTS` and `TARGETS`); `pair_text` joins the
two on two lines (what a tokenizer is trained on, and `SourceSplits.text_of`). Sources, chosen by data.source:

* `pairs_jsonl`: JSON-lines files at data.path (and data.eval_path / data.test_path); data.pair_fields names
  the (inputs, targets) string fields of each object, default ("prompt", "response").
* `pairs_tsv`: tab-separated files with the two columns data.pair_fields (header names, or 0-based indices
  with data.has_header=False).
* `python_docs_qa`: question -> answer pairs from Python's help topics (`pydoc_data.topics`, no data file):
  'Q: Tell me about <section title>.\\nA:' -> the section's first paragraph (`python_docs_qa_pairs`).

The files are read by the JSONL and TSV readers of `llm_jax.data.tfds_sources` (prepared once as TFDS
array_record datasets), so a bad line (not JSON, a missing or non-string field, a wrong column count) is a
one-line "FILE:LINE: reason" error, or is skipped and counted with data.skip_bad_records=True.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Iterator

import ml_collections

from llm_jax.errors import ConfigError
from llm_jax.data.sources import (SOURCES, Record, RecordSource, SourceSplits, prepare_local, tfds_data_dir,
                                  write_generated_jsonl)

INPUTS, TARGETS = "inputs", "targets"
PAIR_SOURCES = ("pairs_jsonl", "pairs_tsv", "python_docs_qa")  # the data.source names registered here
QA_PROMPT = "Q: Tell me about {title}.\nA:"  # python_docs_qa's question; `generate` prompts use the same form
QA_MAX_ANSWER_CHARS = 300  # answers end at the last sentence end before this many characters


def pair_text(record: Record) -> str:
    """A pair's two texts on two lines."""
    return record[INPUTS] + "\n" + record[TARGETS]


class PairRecords:
    """Random-access pair records over a prepared two-text source (whose records are {"text", "text_b"})."""

    def __init__(self, records: RecordSource):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Record:
        record = self.records[index]
        return {INPUTS: record["text"], TARGETS: record["text_b"]}


def pair_fields(data: ml_collections.ConfigDict) -> tuple[str, str]:
    """data.pair_fields as two distinct non-empty names (a ConfigError saying what to set otherwise)."""
    fields = tuple(str(field) for field in data.pair_fields)
    if len(fields) != 2 or not all(fields) or fields[0] == fields[1]:
        raise ConfigError(f"data.pair_fields={tuple(data.pair_fields)!r}: give the two distinct (inputs, targets) "
                          "fields, e.g. --config.data.pair_fields='(\"prompt\", \"response\")' (JSONL keys, TSV "
                          "header names, or 0-based TSV columns)")
    return fields


def _pair_splits(data: ml_collections.ConfigDict, make_source: Any, name: str | None = None) -> SourceSplits:
    """prepare_local over two-text files, its records as pairs."""
    prepared = prepare_local(data, make_source, name)
    splits = {split: PairRecords(records) for split, records in prepared.splits.items()}
    return SourceSplits(splits, pair_text, prepared.skipped_records)


@SOURCES.register("pairs_jsonl")
def jsonl_pairs(data: ml_collections.ConfigDict) -> SourceSplits:
    """JSON-lines files of pairs at data.path: data.pair_fields = (inputs field, targets field)."""
    from llm_jax.data.tfds_sources import LocalSource

    inputs, targets = pair_fields(data)
    return _pair_splits(data, lambda paths: LocalSource("jsonl", paths, text_field=inputs, text_b_field=targets))


@SOURCES.register("pairs_tsv")
def tsv_pairs(data: ml_collections.ConfigDict) -> SourceSplits:
    """Tab-separated files of pairs at data.path: the columns data.pair_fields, data.has_header as for tsv."""
    from llm_jax.data.tfds_sources import LocalSource

    columns = pair_fields(data)
    return _pair_splits(data, lambda paths: LocalSource("tsv", paths, text_columns=columns,
                                                        has_header=data.has_header))


_HEADING = re.compile(r"^(?P<title>\S[^\n]*)\n(?P<rule>[*=\-^]+)$", re.MULTILINE)


def _first_paragraph(body: str) -> str:
    """The first prose paragraph of a section (grammar and code blocks are indented), on one line, cut at the
    last sentence end within QA_MAX_ANSWER_CHARS."""
    for paragraph in body.split("\n\n"):
        if paragraph.strip() and not paragraph.startswith((" ", "\t")):
            text = " ".join(paragraph.split())
            if len(text) <= QA_MAX_ANSWER_CHARS:
                return text
            cut = text.rfind(". ", 0, QA_MAX_ANSWER_CHARS)
            return text[:cut + 1] if cut > 0 else text[:QA_MAX_ANSWER_CHARS]
    return ""


def _sections(topic: str) -> Iterator[tuple[str, str]]:
    """(title, body) of each section of a help topic: a title line underlined by a rule of its length."""
    headings = [m for m in _HEADING.finditer(topic) if len(m["rule"]) == len(m["title"])]
    for heading, following in zip(headings, headings[1:] + [None]):
        yield heading["title"].strip(), topic[heading.end():following.start() if following else len(topic)]


def python_docs_qa_pairs() -> list[dict[str, str]]:
    """{"prompt", "response"} pairs from every titled section of Python's help topics with a prose paragraph,
    in topic order; a title met twice keeps its first section."""
    from llm_jax.data.sources import python_docs_topics

    pairs, seen = [], set()
    for topic in python_docs_topics():
        for title, body in _sections(topic):
            answer = _first_paragraph(body)
            if answer and title not in seen:
                seen.add(title)
                question = "the " + title[4:] if title.startswith("The ") else title
                pairs.append({"prompt": QA_PROMPT.format(title=question), "response": answer})
    return pairs


@SOURCES.register("python_docs_qa")
def python_docs_qa(data: ml_collections.ConfigDict) -> SourceSplits:
    """Question -> answer pairs from Python's help topics (about 400), so the SFT experiment runs offline;
    the last data.validation_fraction of them are held out for evaluation."""
    from llm_jax.data.tfds_sources import LocalSource

    lines = [json.dumps(pair) + "\n" for pair in python_docs_qa_pairs()]
    local = data.copy_and_resolve_references()
    local.path = write_generated_jsonl(os.path.join(tfds_data_dir(data), "python_docs_qa_source"), "qa", lines)
    local.eval_path = local.test_path = ""
    return _pair_splits(local, lambda paths: LocalSource("jsonl", paths, text_field="prompt",
                                                         text_b_field="response"), name="python_docs_qa")
