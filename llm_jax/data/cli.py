"""The commands behind `python -m llm_jax.data`: prepare, train-tokenizer, inspect, stats.

Each command is a plain function that returns the lines it reports (the absl entry point in
`llm_jax/data/__main__.py` prints them), so the logic is importable and testable without flags.
Problems a user can fix raise `CommandError` with a message that says what to run or change.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
from typing import Iterable, Sequence

import numpy as np

from llm_jax.config import ConfigError, default_config
from llm_jax.errors import UserError
from llm_jax.data.punctuation import read_utf8_text
from llm_jax.data.sources import local_record_text
from llm_jax.data.tokenizers import special_ids

COMMANDS = ("prepare", "train-tokenizer", "inspect", "stats")


class CommandError(UserError, ValueError):
    """A problem the user can act on; the message says what to do."""


# ----------------------------------------------------------------------------- shared helpers


def _records(data_dir: str, name: str, split: str):
    """The decoded records of `split`; a dataset never prepared is an error that says to run prepare."""
    from llm_jax.data import tfds_sources

    try:
        return tfds_sources.data_source(data_dir, name, split)
    except FileNotFoundError as error:
        raise _missing_dataset(data_dir, name, error) from None


def _splits(data_dir: str, name: str) -> list[str]:
    """The split names of the prepared dataset, train first."""
    import tensorflow_datasets as tfds

    from llm_jax.data import tfds_sources

    try:
        path = tfds_sources.builder_dir(data_dir, name)
    except FileNotFoundError as error:
        raise _missing_dataset(data_dir, name, error) from None
    splits = list(tfds.builder_from_directory(path).info.splits)
    return sorted(splits, key=lambda s: (s != "train", s))


def _missing_dataset(data_dir: str, name: str, error: Exception) -> CommandError:
    return CommandError(f"{error}: run `python -m llm_jax.data prepare --data_dir={data_dir} --name={name} "
                        "--kind=... --paths=...` first")


def _load_tokenizer(directory: str):
    from llm_jax.data.tokenizers import TOKENIZER_FILE, load_tokenizer

    if not os.path.isfile(os.path.join(directory, TOKENIZER_FILE)):
        raise CommandError(
            f"no tokenizer in {directory} (no {TOKENIZER_FILE} there); run "
            f"`python -m llm_jax.data train-tokenizer --output_dir={directory} ...` first, or point "
            "--tokenizer_dir at a run's DIR/tokenizer"
        )
    return load_tokenizer(directory)


def _shown(text: str, max_chars: int) -> str:
    """`text` cut to `max_chars` characters, quoted with escapes (JSON string), "..." when cut."""
    cut = text if len(text) <= max_chars else text[:max_chars]
    return json.dumps(cut, ensure_ascii=False) + ("..." if len(cut) < len(text) else "")


# ----------------------------------------------------------------------------- prepare


def prepare(*, kind: str, paths: Sequence[str], data_dir: str, name: str, split_by: str = "file",
            text_field: str = "text", text_columns: Sequence[str] = ("text",), label_column: str | None = None,
            labels: Sequence[str] | None = None, has_header: bool = True, delimiter: str = "\t",
            validation_paths: Sequence[str] = (), skip_bad_records: bool = False) -> list[str]:
    """Prepares the dataset (train split from `paths`, validation split from `validation_paths`)."""
    from llm_jax.data import tfds_sources

    if not paths:
        raise CommandError("--paths is empty: give the files (comma-separated, globs allowed) to prepare")
    if not data_dir or not name:
        raise CommandError("give --data_dir (where prepared datasets live) and --name (this dataset's name)")

    def source(files: Sequence[str]) -> tfds_sources.LocalSource:
        try:
            return tfds_sources.LocalSource(
                kind=kind, paths=tuple(files), split_by=split_by, text_field=text_field,
                text_columns=tuple(text_columns), label_column=label_column or None,
                labels=tuple(labels) if labels else None, has_header=has_header, delimiter=delimiter)
        except ValueError as error:  # its fields are the flags of the same names
            raise CommandError(str(error).replace("LocalSource.", "--")) from None

    splits = {"validation": source(validation_paths)} if validation_paths else None
    with contextlib.redirect_stdout(sys.stderr):  # TFDS prints its progress lines: keep stdout for the report
        try:
            builder = tfds_sources.prepare(source(paths), data_dir, splits=splits, name=name,
                                           skip_bad_records=skip_bad_records)
        except OSError as error:  # an unreadable input file, or a --data_dir that cannot be written
            where = error.filename or data_dir
            raise CommandError(f"{where}: {error.strerror or error}; make the input files readable and "
                               f"--data_dir={data_dir} writable, then prepare again") from None
    lines = [f"dataset {name!r}: {os.fspath(builder.data_path)}"]
    for split in ["train"] + (["validation"] if validation_paths else []):
        lines.append(f"  {split}: {builder.info.splits[split].num_examples} records")
    lines.append(f"  skipped: {tfds_sources.skipped_records(builder)} bad records")
    return lines


# ----------------------------------------------------------------------------- train-tokenizer


def training_text(*, data_dir: str | None = None, name: str | None = None, text_file: str | None = None) -> str:
    """The text to fit a tokenizer on: a text file, or the train split of a prepared dataset (one record a line)."""
    if text_file and (data_dir or name):
        raise CommandError("give either --text_file or --data_dir with --name, not both")
    if text_file:
        if not os.path.isfile(text_file):
            raise CommandError(f"--text_file={text_file}: no such file (working directory {os.getcwd()})")
        try:
            return read_utf8_text(text_file)
        except ValueError as error:
            raise CommandError(f"--text_file={error}; give a UTF-8 text file") from None
    if not (data_dir and name):
        raise CommandError("give the training text: --data_dir and --name of a prepared dataset, or --text_file")
    return "\n".join(local_record_text(r) for r in _records(data_dir, name, "train"))


def train_tokenizer(*, tokenizer: str, output_dir: str, vocab_size: int | None = None, model_type: str | None = None,
                    tokenizer_path: str = "", data_dir: str | None = None, name: str | None = None,
                    text_file: str | None = None, sample: str | None = None) -> list[str]:
    """Fits `tokenizer` on the training text, saves it to `output_dir`, reports its size and a sample encoding."""
    from llm_jax.data.tokenizers import TOKENIZERS

    if tokenizer not in TOKENIZERS:
        raise CommandError(f"--tokenizer={tokenizer!r}: choose one of {', '.join(TOKENIZERS.names())}")
    if not output_dir:
        raise CommandError("--output_dir is empty: give the directory to save the tokenizer to")
    data = default_config().data
    data.tokenizer = tokenizer
    data.tokenizer_path = tokenizer_path or ""
    if vocab_size is not None:
        data.tokenizer_vocab_size = vocab_size
    if model_type is not None:
        data.sentencepiece_model_type = model_type
    text = "" if tokenizer_path and tokenizer in ("sentencepiece", "gpt2_bpe") else training_text(
        data_dir=data_dir, name=name, text_file=text_file)
    try:
        fitted = TOKENIZERS.get(tokenizer).fit(text, data)
    except ConfigError as error:  # name the flags, not the config keys
        message = str(error)
        for key, flag in (("data.tokenizer_vocab_size", "--vocab_size"), ("data.tokenizer_path", "--tokenizer_path"),
                          ("data.sentencepiece_model_type", "--model_type")):
            message = message.replace(key, flag)
        raise CommandError(message) from None
    fitted.save(output_dir)
    if sample is None:
        sample = next((line.strip() for line in text.splitlines() if line.strip()), "Hello, world!")[:80]
    ids = fitted.encode(sample)
    return [
        f"{tokenizer} tokenizer saved to {output_dir}",
        f"  vocab size: {fitted.vocab_size}",
        f"  sample: {json.dumps(sample, ensure_ascii=False)}",
        f"  ids ({len(ids)}): {[int(i) for i in ids[:40]]}{' ...' if len(ids) > 40 else ''}",
        f"  decoded: {json.dumps(fitted.decode(ids), ensure_ascii=False)}",
    ]


# ----------------------------------------------------------------------------- inspect


def inspect(*, data_dir: str, name: str, tokenizer_dir: str, seq_len: int, packing: str = "concat_split",
            num_examples: int = 2, split: str = "train", max_chars: int = 60) -> list[str]:
    """`num_examples` rows of a prepared dataset packed as training packs them (the `data.packing` packer and
    next-token rows with segment ids of the Grain pipeline), one line per segment (id, positions, text)."""
    import grain

    from llm_jax.data.objectives import NextTokenRows, Tokenize
    from llm_jax.data.packing import PACKINGS

    if seq_len < 2:
        raise CommandError(f"--seq_len={seq_len}: give at least 2")
    if num_examples < 1:
        raise CommandError(f"--num_examples={num_examples}: give at least 1")
    if packing not in PACKINGS:
        raise CommandError(f"--packing={packing!r}: choose one of {', '.join(PACKINGS.names())}")
    tokenizer = _load_tokenizer(tokenizer_dir)
    records = _records(data_dir, name, split)
    data = default_config().data
    data.update(packing=packing, seq_len=seq_len)
    documents = (grain.MapDataset.source(records).map(lambda record: {"document": local_record_text(record)})
                 .map(Tokenize(tokenizer)).to_iter_dataset())
    rows = PACKINGS.get(packing)(documents, seq_len + 1, data).map(NextTokenRows(separate_documents=True))
    eos_id = special_ids(tokenizer).get("eos")
    lines = [f"dataset {name!r} split {split!r}: {len(records)} documents; tokenizer {tokenizer.kind} "
             f"(vocab {tokenizer.vocab_size}); packing={packing!r} into rows of seq_len={seq_len} as training "
             f"packs them" + ("" if eos_id is None else f"; eos id {eos_id} appended to each document")]
    for index, row in zip(range(num_examples), rows):
        lines += _row_lines(index, row, tokenizer, max_chars)
    return lines


def _task_fields(row: dict[str, np.ndarray]) -> str:
    """The task's other keys in a few words: weight sums (targets, masked tokens, labelled words) and scalars."""
    parts = []
    for key, value in row.items():
        if key.endswith("weights"):
            parts.append(f"{key} {int(np.sum(value))}")
        elif np.ndim(value) == 0:
            parts.append(f"{key}={int(value)}")
    return "".join(f", {part}" for part in parts)


def _row_lines(index: int, row: dict[str, np.ndarray], tokenizer, max_chars: int) -> list[str]:
    """One row: a header line, then one line per segment (token span, positions, decoded inputs)."""
    segments, seq_len = row["segment_ids"], len(row["segment_ids"])
    used = int(np.count_nonzero(segments))
    lines = [f"example {index}: {len(np.unique(segments[segments > 0]))} segments, {used}/{seq_len} tokens, "
             f"{seq_len - used} padding" + _task_fields(row)]
    for segment in np.unique(segments[segments > 0]):
        where = np.flatnonzero(segments == segment)
        positions = row["positions"][where] if "positions" in row else where - where[0]
        text = tokenizer.decode(row["inputs"][where].tolist())
        lines.append(f"  segment {segment}: tokens {where[0]}-{where[-1]}, positions "
                     f"{positions[0]}-{positions[-1]}: {_shown(text, max_chars)}")
    return lines


def inspect_run(config, *, num_examples: int = 2, max_chars: int = 60) -> list[str]:
    """The first rows of the first training batch exactly as `llm_jax.train` builds them from `config`."""
    from llm_jax.data.pipeline import build_data

    data = build_data(config)
    try:
        batch = {key: value[0] for key, value in data.train.next_chunk(1).items()}
    finally:
        data.train.close()
    d = config.data
    lines = [f"data.source={d.source!r} pipeline={d.pipeline!r} objective={d.objective!r} packing={d.packing!r}: "
             f"tokenizer {data.tokenizer.kind} (vocab {data.tokenizer.vocab_size}), batch {batch['inputs'].shape}, "
             f"{data.skipped_records} bad records skipped"]
    if "segment_ids" not in batch:
        batch["segment_ids"] = np.ones_like(batch["inputs"])
        batch["positions"] = np.broadcast_to(np.arange(batch["inputs"].shape[1]), batch["inputs"].shape)
    for index in range(min(num_examples, len(batch["inputs"]))):
        lines += _row_lines(index, {key: value[index] for key, value in batch.items()}, data.tokenizer, max_chars)
    return lines


# ----------------------------------------------------------------------------- stats


def _summary(lengths: Sequence[int]) -> str:
    if not lengths:
        return "mean 0, median 0, max 0"
    return (f"mean {statistics.fmean(lengths):.1f}, median {statistics.median(lengths):g}, "
            f"max {max(lengths)}")


def stats(*, data_dir: str, name: str, tokenizer_dir: str | None = None) -> list[str]:
    """Per split: documents, tokens (characters without a tokenizer) and their per-document spread."""
    tokenizer = _load_tokenizer(tokenizer_dir) if tokenizer_dir else None
    unit = "tokens" if tokenizer is not None else "characters"
    lines = [f"dataset {name!r}" + (f", tokenizer {tokenizer.kind} (vocab {tokenizer.vocab_size})"
                                     if tokenizer is not None else ", characters (no --tokenizer_dir)")]
    for split in _splits(data_dir, name):
        texts: Iterable[str] = (local_record_text(r) for r in _records(data_dir, name, split))
        lengths = [len(tokenizer.encode(t)) if tokenizer is not None else len(t) for t in texts]
        lines.append(f"  {split}: {len(lengths)} documents, {sum(lengths)} {unit}; {unit} per document: "
                     f"{_summary(lengths)}")
    return lines
