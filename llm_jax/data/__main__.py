"""Data tools: prepare local files as a TFDS dataset, train a tokenizer, look at packed rows, count tokens.

    python -m llm_jax.data prepare --kind=text --paths='corpus/*.txt' --split_by=blank_line \\
        --data_dir=data --name=corpus [--validation_paths=held_out.txt]
    python -m llm_jax.data train-tokenizer --data_dir=data --name=corpus --tokenizer=sentencepiece \\
        --vocab_size=8192 --output_dir=tokenizers/corpus          # or --text_file=corpus.txt
    python -m llm_jax.data inspect --data_dir=data --name=corpus --tokenizer_dir=tokenizers/corpus --seq_len=128 \\
        [--packing=first_fit]                                   # packed as training packs them
    python -m llm_jax.data stats --data_dir=data --name=corpus [--tokenizer_dir=tokenizers/corpus]
    python -m llm_jax.data inspect --config=experiments/wikitext2.py   # the rows training would see

The command is the first positional argument; flags may come before or after it.
"""

from __future__ import annotations

from absl import app, flags

from llm_jax.cli import quiet_library_logs, run_reporting_errors
from llm_jax.experiment_files import define_experiment_flag
from llm_jax.config import default_config
from llm_jax.data import cli

# where the dataset lives (every command)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "directory of prepared datasets")
_NAME = flags.DEFINE_string("name", None, "dataset name under --data_dir")
# prepare: the fields of llm_jax.data.tfds_sources.LocalSource
_KIND = flags.DEFINE_enum("kind", "text", ["text", "jsonl", "tsv"], "prepare: the format of the files")
_PATHS = flags.DEFINE_list("paths", [], "prepare: files or globs of the train split (comma-separated)")
_VALIDATION_PATHS = flags.DEFINE_list("validation_paths", [], "prepare: files or globs of a validation split")
_SPLIT_BY = flags.DEFINE_enum("split_by", "file", ["file", "blank_line", "line"],
                              "prepare, kind=text: one document per file, per paragraph or per line")
_TEXT_FIELD = flags.DEFINE_string("text_field", "text", "prepare, kind=jsonl: the text field of each object")
_TEXT_COLUMNS = flags.DEFINE_list("text_columns", ["text"], "prepare, kind=tsv: one text column, or two (pairs)")
_LABEL_COLUMN = flags.DEFINE_string("label_column", None, "prepare, kind=tsv: the label column (with --labels)")
_LABELS = flags.DEFINE_list("labels", None, "prepare, kind=tsv: the allowed labels, comma-separated")
_HAS_HEADER = flags.DEFINE_bool("has_header", True, "prepare, kind=tsv: the first row names the columns")
_DELIMITER = flags.DEFINE_string("delimiter", "\t", "prepare, kind=tsv: the column separator ('\\t' or 'tab' = tab)")
_SKIP_BAD = flags.DEFINE_bool("skip_bad_records", False, "prepare: skip and count bad records instead of failing")
# train-tokenizer
_TEXT_FILE = flags.DEFINE_string("text_file", None, "train-tokenizer: a text file to fit on (instead of a dataset)")
_TOKENIZER = flags.DEFINE_enum("tokenizer", "sentencepiece", ["sentencepiece", "char", "byte", "gpt2_bpe"],
                               "train-tokenizer: the tokenizer kind")
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", None, "train-tokenizer, sentencepiece: vocabulary size "
                                   "(default: data.tokenizer_vocab_size)")
_MODEL_TYPE = flags.DEFINE_enum("model_type", None, ["unigram", "bpe"],
                                "train-tokenizer, sentencepiece: the training algorithm (default: unigram)")
_TOKENIZER_PATH = flags.DEFINE_string("tokenizer_path", "", "train-tokenizer: an existing SentencePiece model, or "
                                      "GPT-2's ranks file (required for gpt2_bpe)")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "train-tokenizer: where to save the tokenizer")
_SAMPLE = flags.DEFINE_string("sample", None, "train-tokenizer: text to show encoded (default: the first line)")
# inspect and stats
_TOKENIZER_DIR = flags.DEFINE_string("tokenizer_dir", None, "inspect, stats: a saved tokenizer directory")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "inspect: packed row length")
_PACKING = flags.DEFINE_string("packing", default_config().data.packing,
                               "inspect: how documents fill rows (data.packing: concat_split or first_fit)")
_NUM_EXAMPLES = flags.DEFINE_integer("num_examples", 2, "inspect: packed rows to show")
_SPLIT = flags.DEFINE_string("split", "train", "inspect: the split to read")
_MAX_CHARS = flags.DEFINE_integer("max_chars", 60, "inspect: characters of each segment's text to show")
_CONFIG = define_experiment_flag("config", "inspect: an experiment file; shows the first training batch its data "
                                 "pipeline builds (instead of --data_dir/--name)")


def _delimiter(value: str) -> str:
    return {"\\t": "\t", "tab": "\t", "TAB": "\t"}.get(value, value)


def _require(**values) -> None:
    missing = [f"--{name}" for name, value in values.items() if not value]
    if missing:
        raise cli.CommandError(f"missing {', '.join(missing)}")


def _run(command: str) -> None:
    if command == "prepare":
        _require(data_dir=_DATA_DIR.value, name=_NAME.value, paths=_PATHS.value)
        lines = cli.prepare(
            kind=_KIND.value, paths=_PATHS.value, data_dir=_DATA_DIR.value, name=_NAME.value,
            split_by=_SPLIT_BY.value, text_field=_TEXT_FIELD.value, text_columns=_TEXT_COLUMNS.value,
            label_column=_LABEL_COLUMN.value, labels=_LABELS.value, has_header=_HAS_HEADER.value,
            delimiter=_delimiter(_DELIMITER.value), validation_paths=_VALIDATION_PATHS.value,
            skip_bad_records=_SKIP_BAD.value)
    elif command == "train-tokenizer":
        _require(output_dir=_OUTPUT_DIR.value)
        lines = cli.train_tokenizer(
            tokenizer=_TOKENIZER.value, output_dir=_OUTPUT_DIR.value, vocab_size=_VOCAB_SIZE.value,
            model_type=_MODEL_TYPE.value, tokenizer_path=_TOKENIZER_PATH.value, data_dir=_DATA_DIR.value,
            name=_NAME.value, text_file=_TEXT_FILE.value, sample=_SAMPLE.value)
    elif command == "inspect" and _CONFIG.value is not None:
        lines = cli.inspect_run(_CONFIG.value, num_examples=_NUM_EXAMPLES.value, max_chars=_MAX_CHARS.value)
    elif command == "inspect":
        _require(data_dir=_DATA_DIR.value, name=_NAME.value, tokenizer_dir=_TOKENIZER_DIR.value)
        lines = cli.inspect(
            data_dir=_DATA_DIR.value, name=_NAME.value, tokenizer_dir=_TOKENIZER_DIR.value, seq_len=_SEQ_LEN.value,
            packing=_PACKING.value, num_examples=_NUM_EXAMPLES.value, split=_SPLIT.value, max_chars=_MAX_CHARS.value)
    else:
        _require(data_dir=_DATA_DIR.value, name=_NAME.value)
        lines = cli.stats(data_dir=_DATA_DIR.value, name=_NAME.value, tokenizer_dir=_TOKENIZER_DIR.value)
    print("\n".join(lines), flush=True)


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] not in cli.COMMANDS:
        given = f"got {argv[1]!r}" if len(argv) > 1 else "got none"
        raise app.UsageError(f"give a command first: one of {', '.join(cli.COMMANDS)} ({given})")
    if len(argv) > 2:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[2:])}")
    quiet_library_logs()
    run_reporting_errors(lambda: _run(argv[1]), (ValueError, FileNotFoundError))


if __name__ == "__main__":
    app.run(main)
