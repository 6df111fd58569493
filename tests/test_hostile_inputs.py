"""Hostile inputs end in one line that names the file or key, and a non-zero exit: never a traceback, a hang or
a silent success.

The cases cover what the commands read: experiment files and --config overrides, data files (text, JSONL, TSV,
CoNLL, punctuation), tokenizer files, work directories, Hugging Face folders, sweep files and the flags of
generate and evaluate, each as written by hand, as random bytes of several lengths, and as valid files with
random truncations or invalid bytes (a fixed seed: the same cases every run). Most run in this process
through the functions the entry points call, and must raise a UserError (or an error the entry point lists
as expected, which `run_reporting_errors` prints as one line); flag parsing must raise the absl error that
app.run prints as one line. A few run as the real commands, started first so that they overlap the rest.

`pytest -s` prints the count; LLM_JAX_HOSTILE_REPORT=PATH writes the table (case -> message) as markdown.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time
from typing import Any, Callable, Iterator, Sequence

import pytest
from absl import flags

from conftest import REPO_ROOT, import_or_fail, subprocess_env

import_or_fail("tensorflow_datasets")
import_or_fail("array_record")

from launch import sweep  # noqa: E402
from llm_jax import config as config_lib  # noqa: E402
from llm_jax import convert  # noqa: E402
from llm_jax.cli import check_saved_run  # noqa: E402
from llm_jax.experiment_files import define_experiment_flag  # noqa: E402
from llm_jax.data.pipeline import build_data  # noqa: E402
from llm_jax.data.tokenizers import TOKENIZER_FILE, load_tokenizer  # noqa: E402
from llm_jax.errors import UserError  # noqa: E402
from llm_jax.models.model_config import ModelConfig, model_config_to_json  # noqa: E402
from llm_jax.training import run_record  # noqa: E402

SEED = 20240611
RANDOM_LENGTHS = (16, 256, 4096)  # random bytes this long are invalid UTF-8 (checked below)
MUTANTS = 6  # mutated copies of each valid file and mutation kind
CASE_TIMEOUT_S = 30  # an in-process case running longer is a hang
COMMAND_TIMEOUT_S = 240
EXPERIMENT = REPO_ROOT / "experiments" / "python_docs.py"
PUNCTUATION = ("O", "COMMA", "PERIOD", "QUESTION")
ERROR_LINES = ("error: ", "FATAL Flags parsing error: ")
NEVER_IN_UTF8 = (*range(0x80, 0xC2), *range(0xF5, 0x100))  # alone, or after ASCII: invalid in UTF-8 text


@dataclasses.dataclass
class Case:
    """One hostile input: how to run it, what the message must name (any of `names`), and the errors besides
    UserError that its entry point prints as one line."""

    name: str
    run: Callable[[], Any]
    names: tuple[str, ...]
    expected: tuple[type[BaseException], ...] = ()


@dataclasses.dataclass
class Outcome:
    """What a case ended with: its message, and what is wrong with that (None: nothing)."""

    name: str
    message: str
    problem: str | None  # None: a one-line error naming the file or key


class _Files:
    """Writes the inputs under one temporary directory, with a seeded random source for the variants."""

    def __init__(self, root: pathlib.Path):
        self.root, self.rng, self._count = root, random.Random(SEED), 0

    def write(self, name: str, payload: bytes | str) -> str:
        self._count += 1
        path = self.root / f"{self._count:03d}_{name}"
        path.write_bytes(payload.encode("utf-8") if isinstance(payload, str) else payload)
        return str(path)

    def directory(self, name: str, files: dict[str, bytes | str] | None = None) -> str:
        self._count += 1
        path = self.root / f"{self._count:03d}_{name}"
        path.mkdir()
        for file, payload in (files or {}).items():
            (path / file).write_bytes(payload.encode("utf-8") if isinstance(payload, str) else payload)
        return str(path)

    def random_bytes(self, length: int) -> bytes:
        payload = self.rng.randbytes(length)
        with pytest.raises(UnicodeDecodeError):
            payload.decode("utf-8")  # the cases below rely on it
        return payload

    def invalid_byte(self, payload: bytes) -> bytes:
        """`payload` (ASCII) with one byte that no UTF-8 text holds inserted at a random place."""
        at = self.rng.randrange(len(payload) + 1)
        return payload[:at] + bytes([self.rng.choice(NEVER_IN_UTF8)]) + payload[at:]

    def cut_line(self, payload: bytes) -> bytes:
        """`payload` cut inside one of its (non-blank) lines: the line loses at least its last character."""
        lines = payload.splitlines(keepends=True)
        index = self.rng.choice([i for i, line in enumerate(lines) if len(line.strip()) > 1])
        cut = self.rng.randrange(1, len(lines[index].rstrip(b"\r\n")))
        return b"".join(lines[:index]) + lines[index][:cut]


# ----------------------------------------------------------------------------- running and judging


def _problem(message: str, names: Sequence[str]) -> str | None:
    if "Traceback" in message:
        return "a traceback"
    if "\n" in message.strip():
        return "more than one line"
    if not any(name in message for name in names):
        return f"names none of {list(names)}"
    return None


@pytest.fixture
def _alarm():
    """SIGALRM -> TimeoutError: a case that hangs fails instead of stalling the suite."""
    def ring(signum, frame):
        raise TimeoutError(f"no result after {CASE_TIMEOUT_S}s: a hang")

    previous = signal.signal(signal.SIGALRM, ring)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def run_case(case: Case) -> Outcome:
    """Runs one in-process case; anything but a one-line user error is reported as its problem."""
    signal.alarm(CASE_TIMEOUT_S)
    try:
        case.run()
    except TimeoutError as error:  # raised by the _alarm fixture
        return Outcome(case.name, str(error), "a hang")
    except (UserError, flags.Error, *case.expected) as error:
        return Outcome(case.name, str(error), _problem(str(error), case.names))
    except Exception as error:  # noqa: BLE001 - a bug the table reports, with the others, instead of stopping
        return Outcome(case.name, f"{type(error).__name__}: {error}", f"a traceback ({type(error).__name__})")
    finally:
        signal.alarm(0)
    return Outcome(case.name, "(no error)", "no error: the input was accepted")


def judge_command(name: str, returncode: int, stderr: str, names: Sequence[str]) -> Outcome:
    """A command's outcome: a non-zero exit status, no traceback, exactly one error line, naming the file or key."""
    lines = [line for line in stderr.splitlines() if line.startswith(ERROR_LINES)]
    tail = stderr.strip().splitlines()
    message = lines[-1] if lines else (tail[-1] if tail else "")
    if returncode == 0:
        return Outcome(name, message, "exit status 0")
    if "Traceback" in stderr:
        return Outcome(name, message, "a traceback")
    if len(lines) != 1:
        return Outcome(name, message, f"{len(lines)} error lines")
    return Outcome(name, message, _problem(message, names))


# ----------------------------------------------------------------------------- experiment files and flags


def experiment_flags(argv: Sequence[str]) -> Callable[[], Any]:
    """What a command taking --config=FILE[:arg] does before any work: parse its flags (the experiment file,
    then the --config.key=value overrides), then validate the config for one device."""
    def run() -> None:
        values = flags.FlagValues()
        command = ["llm_jax.train", *argv]
        holder = define_experiment_flag("config", "experiment file", flag_values=values, sys_argv=command)
        flags.DEFINE_string("workdir", None, "run directory", flag_values=values)
        values(command)
        config_lib.validate(holder.value, 1)

    return run


def experiment_cases(files: _Files) -> Iterator[Case]:
    def case(name: str, path: str, arg: str = ":quick") -> Case:
        return Case(f"experiment file: {name}", experiment_flags([f"--config={path}{arg}"]), (path,))

    source = EXPERIMENT.read_bytes()
    assert source.isascii()
    yield case("missing", str(files.root / "missing.py"))
    yield case("a directory", files.directory("experiments"))
    yield case("empty", files.write("empty.py", b""))
    for length in RANDOM_LENGTHS:
        yield case(f"{length} random bytes", files.write("random.py", files.random_bytes(length)))
    yield case("syntax error", files.write("syntax.py", "def get_config(:\n    pass\n"))
    yield case("failing import", files.write("imports.py", "import llm_jax_no_such_module\n"))
    yield case("no get_config", files.write("no_get_config.py", "CONFIG = {}\n"))
    yield case("get_config raises", files.write("raises.py", "def get_config(arg=None):\n"
                                                             "    raise RuntimeError('x')\n"))
    for value in ("42", "None", "{'train': {'steps': 1}}"):
        yield case(f"get_config returns {value}", files.write("returns.py", f"def get_config(arg=None):\n"
                                                                             f"    return {value}\n"))
    yield case("unknown variant", str(EXPERIMENT), ":no_such_variant")
    last = b"return apply_presets(config, presets)"
    end = source.rindex(last) + len(last) - 1  # every shorter prefix is broken
    for _ in range(MUTANTS):
        cut = files.rng.randrange(end)
        yield case(f"python_docs.py cut at byte {cut}", files.write("cut.py", source[:cut]))
    for index in range(MUTANTS):
        yield case(f"python_docs.py with an invalid byte #{index}",
                   files.write("invalid_byte.py", files.invalid_byte(source)))


OVERRIDES = (  # (argument, what the message names): unknown keys, wrong types, values out of range, unknown flags
    ("--config.train.nosuch=1", "train.nosuch"), ("--config.trian.steps=10", "trian.steps"),
    ("--config.nosuch=1", "nosuch"), ("--config.train.steps=abc", "train.steps"),
    ("--config.model.dropout=high", "model.dropout"), ("--config.data.seq_len=1.5", "data.seq_len"),
    ("--config.train.steps=0", "train.steps"), ("--config.train.steps=-5", "train.steps"),
    ("--config.train.batch_size=-8", "train.batch_size"), ("--config.train.batch_size=0", "train.batch_size"),
    ("--config.optimizer.learning_rate=-1", "optimizer.learning_rate"), ("--config.data.seq_len=0", "data.seq_len"),
    ("--config.model.max_len=0", "model.max_len"), ("--config.model.num_heads=3", "model.num_heads"),
    ("--config.model.dropout=1.5", "model.dropout"), ("--config.mesh.data=3", "mesh"),
    ("--config.data.source=no_such_source", "data.source"),
    ("--config.data.validation_fraction=0", "data.validation_fraction"),
    ("--nosuchflag=1", "nosuchflag"),
)


def override_cases() -> Iterator[Case]:
    for argument, key in OVERRIDES:
        yield Case(f"flag {argument}", experiment_flags([f"--config={EXPERIMENT}:quick", argument]), (key,))


# ----------------------------------------------------------------------------- data files and tokenizer files


FORMATS = {  # the data keys that read a file of each kind
    "text": {"source": "text_file", "split_by": "blank_line"},
    "jsonl": {"source": "jsonl"},
    "tsv": {"source": "tsv", "text_columns": ("text",), "label_column": "label", "labels": ("pos", "neg")},
    "conll": {"source": "conll", "labels": ("O", "PER")},
    "punctuation": {"source": "punctuation", "labels": PUNCTUATION},
}
VALID_JSONL = "".join(json.dumps({"text": f"document {i}: the quick brown fox, number {i}."}) + "\n" for i in range(30))
VALID_TSV = "text\tlabel\n" + "".join(f"row {i} is {'good' if i % 2 else 'bad'}\t{'pos' if i % 2 else 'neg'}\n"
                                      for i in range(30))
VALID_TEXT = "".join(f"Paragraph {i}, with words: the quick brown fox jumps.\nIt ends here.\n\n" for i in range(30))


def data_run(tfds_dir: str, keys: dict[str, Any]) -> Callable[[], Any]:
    """What llm_jax.train does with the data before compiling (validate, build_data), then the first training
    and evaluation batches, where a bad record read lazily, or a stream that never yields, would show."""
    def run() -> None:
        config = config_lib.default_config()
        config.train.batch_size = 4
        config.data.tfds_data_dir = tfds_dir
        for key, value in keys.items():
            config.data[key] = value
        config_lib.validate(config, 1)
        data = build_data(config)
        try:
            data.train.next_chunk(1)
            next(data.eval_batches(config.data.eval_split, 1))
        finally:
            data.train.close()

    return run


def data_file_cases(files: _Files, tfds_dir: str) -> Iterator[Case]:
    """Each format with random bytes, an empty or blank file, invalid UTF-8, a directory, a glob matching nothing."""
    def case(name: str, keys: dict[str, Any], *names: str) -> Case:
        return Case(name, data_run(tfds_dir, keys), names or (keys["path"],))

    for kind, keys in FORMATS.items():
        for length in RANDOM_LENGTHS:
            path = files.write(f"random.{kind}", files.random_bytes(length))
            yield case(f"{kind} file: {length} random bytes", {**keys, "path": path})
        yield case(f"{kind} file: empty", {**keys, "path": files.write(f"empty.{kind}", b"")})
        yield case(f"{kind} file: only blank lines", {**keys, "path": files.write(f"blank.{kind}", b"\n \n\t\n")})
        path = files.write(f"latin1.{kind}", "caf\u00e9 au lait\tpos\n".encode("latin-1"))
        yield case(f"{kind} file: not UTF-8 (Latin-1)", {**keys, "path": path})
    text = FORMATS["text"]
    yield case("data.path is a directory", {**text, "path": files.directory("corpus")})
    yield case("data.path glob matches nothing", {**text, "path": str(files.root / "*.no_such_suffix")})
    yield case("data.path missing", {**text, "path": str(files.root / "missing.txt")})
    yield case("data.path empty", {**text, "path": " , "}, "data.path")
    valid = files.write("valid.txt", VALID_TEXT)
    yield case("data.eval_path missing", {**text, "path": valid, "eval_path": str(files.root / "gone.txt")},
               "gone.txt")
    yield case("data.test_path is a directory", {**text, "path": valid, "test_path": str(files.root)}, str(files.root))
    yield case("data.pipeline=windows on a tiny file", {**text, "path": files.write("tiny.txt", "tiny text\n\nx\n"),
                                                        "pipeline": "windows"}, "data.seq_len")


def record_cases(files: _Files, tfds_dir: str) -> Iterator[Case]:
    """Records that are not what the format or the config asks for."""
    def case(name: str, keys: dict[str, Any], *names: str) -> Case:
        return Case(name, data_run(tfds_dir, keys), names or (keys["path"],))

    jsonl, tsv = FORMATS["jsonl"], FORMATS["tsv"]
    for line in ("[1, 2]", '"text"', "3", "null", '{"body": "no text field"}', '{"text": 7}', "{not json",
                 '\ufeff{"text": "a byte-order mark"}'):
        yield case(f"JSONL line {line!r}", {**jsonl, "path": files.write("bad.jsonl", VALID_JSONL + line + "\n")})
    yield case("JSONL: data.text_field not in the objects",
               {**jsonl, "path": files.write("field.jsonl", VALID_JSONL), "text_field": "body"})
    yield case("JSONL: every text empty (the stream would wait forever)",
               {**jsonl, "path": files.write("empty_texts.jsonl", '{"text": ""}\n' * 20)}, "data.text_field")
    for name, content in (("too few columns", VALID_TSV + "only one column\n"),
                          ("too many columns", VALID_TSV + "a\tpos\textra\n"),
                          ("an unknown label", VALID_TSV + "fine text\tmaybe\n"),
                          ("a header but no rows", "text\tlabel\n"),
                          ("no 'text' column", VALID_TSV.replace("text\tlabel", "body\tlabel", 1))):
        yield case(f"TSV: {name}", {**tsv, "path": files.write("bad.tsv", content)})
    yield case("TSV: data.label_column without data.labels",
               {**tsv, "path": files.write("ok.tsv", VALID_TSV), "labels": ()}, "data.label", "data.labels")
    conll = FORMATS["conll"]
    for name, content in (("an unknown tag", "John PER\nruns O\n\nMary XYZ\n\n"),
                          ("only comments", "# sent_id = 1\n# text = nothing\n\n"),
                          ("a line without a tag column", "John PER\nruns\n\n")):
        yield case(f"CoNLL: {name}", {**conll, "path": files.write("bad.conll", content),
                                      "conll_columns": (0, 1)})
    punctuation = FORMATS["punctuation"]
    yield case("punctuation: only punctuation", {**punctuation, "path": files.write("marks.txt", ", . ? !\n")})
    yield case("punctuation: data.labels not the punctuation tags",
               {**punctuation, "path": files.write("words.txt", VALID_TEXT), "labels": ("O", "X")}, "data.labels")


def mutant_cases(files: _Files, tfds_dir: str) -> Iterator[Case]:
    """Valid JSONL, TSV and text files with a line cut short, a row's tab or label changed, or an invalid byte."""
    def case(name: str, keys: dict[str, Any]) -> Case:
        return Case(name, data_run(tfds_dir, keys), (keys["path"],))

    jsonl, tsv, text = VALID_JSONL.encode(), VALID_TSV.encode(), VALID_TEXT.encode()
    for index in range(MUTANTS):
        yield case(f"JSONL cut inside a line #{index}", {**FORMATS["jsonl"],
                                                         "path": files.write("cut.jsonl", files.cut_line(jsonl))})
        yield case(f"JSONL with an invalid byte #{index}",
                   {**FORMATS["jsonl"], "path": files.write("byte.jsonl", files.invalid_byte(jsonl))})
        rows = tsv.splitlines(keepends=True)
        row = files.rng.randrange(1, len(rows))
        tab_gone = rows[:row] + [rows[row].replace(b"\t", b" ")] + rows[row + 1:]
        yield case(f"TSV row {row} without its tab",
                   {**FORMATS["tsv"], "path": files.write("tab.tsv", b"".join(tab_gone))})
        label = "".join(files.rng.choice("xyzw") for _ in range(5)).encode()
        relabelled = rows[:row] + [rows[row].rsplit(b"\t", 1)[0] + b"\t" + label + b"\n"] + rows[row + 1:]
        yield case(f"TSV row {row} labelled {label.decode()!r}",
                   {**FORMATS["tsv"], "path": files.write("label.tsv", b"".join(relabelled))})
        yield case(f"TSV with an invalid byte #{index}",
                   {**FORMATS["tsv"], "path": files.write("byte.tsv", files.invalid_byte(tsv))})
        yield case(f"text with an invalid byte #{index}",
                   {**FORMATS["text"], "path": files.write("byte.txt", files.invalid_byte(text))})


def tokenizer_cases(files: _Files, tfds_dir: str) -> Iterator[Case]:
    """data.tokenizer_path at garbage: a SentencePiece model, a WordPiece vocab.txt, GPT-2's ranks file."""
    corpus = files.write("corpus.txt", VALID_TEXT)

    def case(name: str, tokenizer: str, path: str) -> Case:
        keys = {**FORMATS["text"], "path": corpus, "tokenizer": tokenizer, "tokenizer_path": path}
        return Case(f"tokenizer={tokenizer}: {name}", data_run(tfds_dir, keys), (path,))

    for tokenizer in ("sentencepiece", "wordpiece", "gpt2_bpe"):
        for length in RANDOM_LENGTHS:
            path = files.write(f"random.{tokenizer}", files.random_bytes(length))
            yield case(f"{length} random bytes", tokenizer, path)
        yield case("a text file", tokenizer, files.write(f"text.{tokenizer}", "hello\nworld\n"))
        yield case("missing", tokenizer, str(files.root / f"missing.{tokenizer}"))
        yield case("a directory", tokenizer, files.directory(f"dir.{tokenizer}"))


DATA_COMMAND_EXPECTED = (ValueError, FileNotFoundError)  # what `python -m llm_jax.data` prints as one line


def data_command_cases(files: _Files) -> Iterator[Case]:
    """`python -m llm_jax.data` prepare, train-tokenizer, inspect and stats on garbage (the functions it runs)."""
    from llm_jax.data import cli

    data_dir = str(files.root / "prepared")

    def case(name: str, run: Callable[[], Any], *names: str) -> Case:
        return Case(f"llm_jax.data {name}", run, names, DATA_COMMAND_EXPECTED)

    for kind in ("text", "jsonl", "tsv"):
        path = files.write(f"random.{kind}", files.random_bytes(256))
        yield case(f"prepare --kind={kind} --paths=<random bytes>",
                   lambda k=kind, p=path: cli.prepare(kind=k, paths=[p], data_dir=data_dir, name=f"random_{k}"), path)
    tsv = files.write("labels.tsv", VALID_TSV)
    yield case("prepare --kind=tsv --label_column without --labels",
               lambda: cli.prepare(kind="tsv", paths=[tsv], data_dir=data_dir, name="labels", label_column="label"),
               "--label_column")
    directory = files.directory("corpus_dir")
    yield case("prepare --paths=<a directory>",
               lambda: cli.prepare(kind="text", paths=[directory], data_dir=data_dir, name="dir"), directory)
    text_file = files.write("random.txt", files.random_bytes(256))
    yield case("train-tokenizer --text_file=<random bytes>",
               lambda: cli.train_tokenizer(tokenizer="char", output_dir=str(files.root / "tok"), text_file=text_file),
               text_file)
    model = files.write("random.model", files.random_bytes(256))
    yield case("train-tokenizer --tokenizer_path=<random bytes>",
               lambda: cli.train_tokenizer(tokenizer="sentencepiece", output_dir=str(files.root / "tok"),
                                           tokenizer_path=model), model)
    tokenizer_dir = files.directory("tokenizer", {TOKENIZER_FILE: files.random_bytes(64)})
    yield case("stats --tokenizer_dir=<random tokenizer.json>",
               lambda: cli.stats(data_dir=data_dir, name="never_prepared", tokenizer_dir=tokenizer_dir), tokenizer_dir)
    yield case("stats on a dataset never prepared",
               lambda: cli.stats(data_dir=data_dir, name="never_prepared"), "never_prepared")


# ----------------------------------------------------------------------------- work directories


def valid_record() -> bytes:
    """A DIR/config.json as llm_jax.train writes it (default config and model config)."""
    return json.dumps({"config": config_lib.config_to_dict(config_lib.default_config()),
                       "model_config": model_config_to_json(ModelConfig()), "provenance": {}, "starts": []},
                      indent=2, default=str).encode()


RECORDS = ("", "[]", "{}", '{"config": 5}', '{"config": {"model": 5}}', '{"config": {"no_such_section": {}}}',
           '{"config": {"train": {"steps": "abc"}}}', '{"config": {"train": {"no_such_key": 1}}}', '{"config": {}}',
           '{"config": {}, "model_config": 5}', '{"config": {}, "model_config": {"no_such_field": 1}}',
           '{"config": {}, "model_config": {}, "starts": [5]}')


def workdir_cases(files: _Files) -> Iterator[Case]:
    """evaluate, generate and convert --to read a run: `check_saved_run` is what they call first."""
    def case(name: str, workdir: str, *names: str) -> Case:
        return Case(f"--workdir: {name}", lambda: check_saved_run(workdir), names or (workdir,))

    def with_record(name: str, payload: bytes | str) -> str:
        return files.directory(name, {run_record.CONFIG_FILE: payload})

    yield case("missing", str(files.root / "no_such_run"))
    yield case("a file", files.write("not_a_dir", b"x"))
    yield case("not a run (no config.json)", files.directory("not_a_run"))
    for length in RANDOM_LENGTHS:
        workdir = with_record("random_record", files.random_bytes(length))
        yield case(f"config.json of {length} random bytes", workdir, workdir)
        yield Case(f"read_record: config.json of {length} random bytes", lambda w=workdir: run_record.read_record(w),
                   (workdir,))
    for text in RECORDS:
        workdir = with_record("odd_record", text)
        yield case(f"config.json {text!r}", workdir, workdir)
    record = valid_record()
    for index in range(MUTANTS):
        workdir = with_record("cut_record", files.cut_line(record))
        yield case(f"config.json cut inside a line #{index}", workdir, workdir)
        workdir = with_record("byte_record", files.invalid_byte(record))
        yield case(f"config.json with an invalid byte #{index}", workdir, workdir)
    yield case("a run without checkpoints", with_record("no_checkpoints", record), "checkpoints")
    workdir = with_record("unfinished_checkpoint", record)
    os.makedirs(os.path.join(workdir, "checkpoints", "20"))  # a save that never completed
    yield case("a run whose only checkpoint is unfinished", workdir, "checkpoints")


SPECS = ("", "[]", '{"kind": "no_such_kind"}', '{"kind": "char"}', '{"kind": "sentencepiece"}',
         '{"kind": "sentencepiece", "model_file": "spm.model"}', '{"kind": "wordpiece", "vocab_file": "vocab.txt"}')


def saved_tokenizer_cases(files: _Files) -> Iterator[Case]:
    """DIR/tokenizer damaged: what generate (and a resumed train) load before anything else."""
    def case(name: str, directory: str) -> Case:
        return Case(f"DIR/tokenizer: {name}", lambda: load_tokenizer(directory), (directory,))

    for length in RANDOM_LENGTHS:
        yield case(f"tokenizer.json of {length} random bytes",
                   files.directory("tokenizer", {TOKENIZER_FILE: files.random_bytes(length)}))
    for spec in SPECS:
        yield case(f"tokenizer.json {spec!r}", files.directory("tokenizer", {TOKENIZER_FILE: spec}))
    yield case("spm.model of random bytes", files.directory("tokenizer", {
        TOKENIZER_FILE: '{"kind": "sentencepiece", "model_file": "spm.model"}', "spm.model": files.random_bytes(256)}))
    yield case("vocab.txt changed since it was saved", files.directory("tokenizer", {
        TOKENIZER_FILE: '{"kind": "wordpiece", "vocab_file": "vocab.txt", "sha256": "0"}', "vocab.txt": "[UNK]\n"}))


# ----------------------------------------------------------------------------- Hugging Face folders (convert --from=hf)


HF_CONFIG = {"architectures": ["BertModel"], "model_type": "bert", "hidden_size": 32, "num_attention_heads": 2,
             "num_hidden_layers": 1, "intermediate_size": 64, "vocab_size": 10, "max_position_embeddings": 16,
             "hidden_act": "gelu"}


def convert_cases(files: _Files) -> Iterator[Case]:
    """A Hugging Face folder whose config.json, safetensors or index is garbage."""
    import numpy as np
    from safetensors.numpy import save

    weights = save({"bert.embeddings.word_embeddings.weight": np.zeros((10, 32), np.float32)})
    config = json.dumps(HF_CONFIG)

    def case(name: str, folder: dict[str, bytes | str]) -> Case:
        src = files.directory("hf", folder)
        return Case(f"convert --from=hf: {name}", lambda: convert.import_hf(src, os.path.join(src, "imported")),
                    (src,), convert.EXPECTED)

    for length in RANDOM_LENGTHS:
        yield case(f"config.json of {length} random bytes", {"config.json": files.random_bytes(length),
                                                             "model.safetensors": weights})
        yield case(f"model.safetensors of {length} random bytes", {"config.json": config,
                                                                   "model.safetensors": files.random_bytes(length)})
    for text in ("", "[1, 2]", "{}", '{"model_type": "gpt2"}'):
        yield case(f"config.json {text!r}", {"config.json": text, "model.safetensors": weights})
    for key, value in (("hidden_size", "abc"), ("hidden_size", -32), ("num_attention_heads", None),
                       ("architectures", 5), ("hidden_act", ["gelu"]), ("layer_norm_eps", "small")):
        yield case(f"config.json {key}={value!r}", {"config.json": json.dumps({**HF_CONFIG, key: value}),
                                                    "model.safetensors": weights})
    yield case("no weights", {"config.json": config})
    yield case("model.safetensors cut in half", {"config.json": config,
                                                 "model.safetensors": weights[:len(weights) // 2]})
    yield case("model.safetensors missing tensors", {"config.json": config, "model.safetensors": weights})
    index = "model.safetensors.index.json"
    yield case("index of random bytes", {"config.json": config, index: files.random_bytes(64)})
    yield case("index weight_map a list", {"config.json": config, index: '{"weight_map": [1]}'})


# ----------------------------------------------------------------------------- sweep files (launch.sweep)


SWEEP_HEADER = f"""
import importlib.util

_spec = importlib.util.spec_from_file_location("_python_docs", {str(EXPERIMENT)!r})
_python_docs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_python_docs)


def get_config(arg=None):
    return _python_docs.get_config(arg)
"""


def sweep_cases(files: _Files) -> Iterator[Case]:
    """Sweep files that are not Python, lack or break get_sweep(), or sweep keys that do not exist or cannot work."""
    def case(name: str, path: str, extra: Sequence[str] = (), *names: str) -> Case:
        run = lambda: sweep.expand_sweep(f"{path}:quick", str(files.root / "sweep"), extra)  # noqa: E731
        return Case(f"sweep: {name}", run, names or (path,))

    for length in RANDOM_LENGTHS:
        yield case(f"{length} random bytes", files.write("sweep.py", files.random_bytes(length)))
    yield case("syntax error", files.write("sweep.py", SWEEP_HEADER + "def get_sweep(:\n"))
    yield case("no get_sweep", files.write("sweep.py", SWEEP_HEADER))
    for body, names in (("raise RuntimeError('x')", ()), ("return []", ()), ("return 5", ()), ("return [5]", ()),
                        ("return [{'train.nosuch': 1}]", ("train.nosuch",)),
                        ("return [{'nosuch.steps': 1}]", ("nosuch.steps",)),
                        ("return [{'train.steps': 'abc'}]", ("train.steps",)),
                        ("return [{'train.steps': 0}]", ("train.steps",)),
                        ("return [{'train.batch_size': -4}]", ("train.batch_size",))):
        path = files.write("sweep.py", f"{SWEEP_HEADER}\n\ndef get_sweep():\n    {body}\n")
        yield case(f"get_sweep: {body}", path, (), *names)
    path = files.write("sweep.py", "def get_config(arg=None):\n    return 42\n\n\ndef get_sweep():\n    return [{}]\n")
    yield case("get_config returns 42", path)
    valid = files.write("sweep.py", f"{SWEEP_HEADER}\n\ndef get_sweep():\n    return [{{'train.steps': 10}}]\n")
    for extra, key in (("--config.train.nosuch=1", "train.nosuch"), ("--config.data.seq_len=0", "data.seq_len"),
                       ("--config.train.batch_size=abc", "train.batch_size"),
                       ("config.train.steps=5", "config.train.steps=5")):
        yield case(f"extra train argument {extra}", valid, (extra,), key)


# ----------------------------------------------------------------------------- the real commands


# Runs each argv of a JSON list through an entry point's flags and main() the way absl's app.run does (one
# import for many cases: generate and evaluate define the same flags, so they cannot share this process).
APP_RUN_EACH = r"""
import contextlib, io, json, sys, traceback
from absl import flags
module = __import__(sys.argv[1], fromlist=["main"])
results = []
for argv in json.load(sys.stdin):
    flags.FLAGS.unparse_flags()
    stderr, returncode = io.StringIO(), 0
    with contextlib.redirect_stderr(stderr):
        try:
            try:
                rest = flags.FLAGS([sys.argv[1], *argv])
            except flags.Error as error:
                print(f"FATAL Flags parsing error: {error}", file=sys.stderr)
                returncode = 1
            else:
                module.main(rest)
        except SystemExit as exit:
            returncode = exit.code if isinstance(exit.code, int) else 1
            if isinstance(exit.code, str):
                print(exit.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            returncode = 1
    results.append({"returncode": returncode, "stderr": stderr.getvalue()})
print(json.dumps(results))
"""


@dataclasses.dataclass
class Command:
    """A started command: one case (`names` is what its error must name), or several through APP_RUN_EACH."""

    name: str
    process: subprocess.Popen
    names: tuple[str, ...] = ()
    each: list[tuple[str, list[str], tuple[str, ...]]] | None = None  # (case name, argv, names)


def _start(args: Sequence[str], stdin: str | None = None) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, *args], cwd=REPO_ROOT, env=subprocess_env(), text=True,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdin.write(stdin or "")
    process.stdin.close()
    process.stdin = None  # written: communicate() only reads
    return process


def _run_flag_cases(files: _Files) -> dict[str, list[tuple[str, list[str], tuple[str, ...]]]]:
    """generate's and evaluate's flag values that cannot work, and work directories that are not runs."""
    not_run = files.directory("not_a_run")
    random_run = files.directory("random_run", {run_record.CONFIG_FILE: files.random_bytes(256)})
    no_checkpoints = files.directory("no_checkpoints", {run_record.CONFIG_FILE: valid_record()})
    workdirs = [("--workdir not a run", [f"--workdir={not_run}"], (not_run,)),
                ("--workdir with a config.json of random bytes", [f"--workdir={random_run}"], (random_run,)),
                ("--workdir without checkpoints", [f"--workdir={no_checkpoints}"], ("checkpoints",)),
                ("no --workdir", [], ("workdir",)), ("--nosuchflag=1", [f"--workdir={not_run}", "--nosuchflag=1"],
                                                    ("nosuchflag",))]
    generate = [(flag, [f"--workdir={no_checkpoints}", flag], (flag.split("=")[0],)) for flag in (
        "--top_p=0", "--top_p=1.5", "--top_p=nan", "--temperature=-1", "--temperature=inf", "--max_new_tokens=0",
        "--max_new_tokens=-5", "--max_new_tokens=abc", "--top_k=-1", "--prompt=")]
    evaluate = [(flag, [f"--workdir={no_checkpoints}", flag], ("--eval_steps",)) for flag in (
        "--eval_steps=0", "--eval_steps=-5", "--eval_steps=abc")]
    return {"llm_jax.generate": workdirs + generate, "llm_jax.evaluate": workdirs + evaluate}


def start_commands(files: _Files) -> list[Command]:
    """One real command per entry point, started at once so that they run beside the in-process cases."""
    random_config = files.write("random_experiment.py", files.random_bytes(256))
    hf = files.directory("hf_garbage", {"config.json": files.random_bytes(256), "model.safetensors": b"\x00" * 8})
    commands = [
        Command("python -m llm_jax.train --config=python_docs.py:quick --config.train.steps=0",
                _start(["-m", "llm_jax.train", f"--config={EXPERIMENT}:quick", "--config.train.steps=0",
                        f"--workdir={files.root / 'train_run'}"]), ("train.steps",)),
        Command("python -m llm_jax.data inspect --config=<random bytes>",
                _start(["-m", "llm_jax.data", "inspect", f"--config={random_config}"]), (random_config,)),
        Command("python -m launch.sweep --config=<random bytes>",
                _start(["-m", "launch.sweep", f"--config={random_config}", f"--sweep_dir={files.root / 'sweep_dir'}"]),
                (random_config,)),
        Command("python -m llm_jax.convert --from=hf --src=<garbage>",
                _start(["-m", "llm_jax.convert", "--from=hf", f"--src={hf}", f"--workdir={files.root / 'hf_run'}"]),
                (hf,)),
    ]
    for module, cases in _run_flag_cases(files).items():
        process = _start(["-c", APP_RUN_EACH, module], json.dumps([argv for _, argv, _ in cases]))
        commands.append(Command(f"python -m {module}", process, each=cases))
    return commands


def finish_commands(commands: Sequence[Command]) -> list[Outcome]:
    """The outcome of each command (each case of an APP_RUN_EACH command)."""
    outcomes = []
    for command in commands:
        try:
            stdout, stderr = command.process.communicate(timeout=COMMAND_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            command.process.kill()
            outcomes.append(Outcome(command.name, "", f"no exit after {COMMAND_TIMEOUT_S}s: a hang"))
            continue
        if command.each is None:
            outcomes.append(judge_command(command.name, command.process.returncode, stderr, command.names))
            continue
        assert command.process.returncode == 0, stderr[-3000:]
        results = json.loads(stdout.strip().splitlines()[-1])
        for (name, _, names), result in zip(command.each, results):
            outcomes.append(judge_command(f"{command.name} {name}", result["returncode"], result["stderr"], names))
    return outcomes


# ----------------------------------------------------------------------------- the test


def _report(outcomes: Sequence[Outcome], root: str) -> None:
    """The table (case -> message) as markdown at $LLM_JAX_HOSTILE_REPORT, when set; `root` (the temporary
    directory of the inputs) is shown as <tmp>."""
    path = os.environ.get("LLM_JAX_HOSTILE_REPORT")
    if not path:
        return

    def cell(text: str) -> str:
        return text.replace(root, "<tmp>").replace("|", "\\|").replace("\n", " ")

    rows = [f"| {cell(o.name)} | {cell(o.message)} |" for o in outcomes]
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"{len(outcomes)} hostile inputs\n\n| input | message |\n| --- | --- |\n" + "\n".join(rows) + "\n")


def test_hostile_inputs_end_in_one_line_naming_the_file_or_key(tmp_path, _alarm):
    files = _Files(tmp_path)
    commands = start_commands(files)
    try:
        tfds_dir = str(tmp_path / "tfds")
        cases = [*experiment_cases(files), *override_cases(), *data_file_cases(files, tfds_dir),
                 *record_cases(files, tfds_dir), *mutant_cases(files, tfds_dir), *tokenizer_cases(files, tfds_dir),
                 *data_command_cases(files), *workdir_cases(files), *saved_tokenizer_cases(files),
                 *convert_cases(files), *sweep_cases(files)]
        started = time.monotonic()
        outcomes = [run_case(case) for case in cases]
        in_process_s = time.monotonic() - started
        outcomes += finish_commands(commands)
    finally:
        for command in commands:
            if command.process.poll() is None:
                command.process.kill()
    _report(outcomes, str(tmp_path))
    print(f"{len(outcomes)} hostile inputs ({len(cases)} in-process in {in_process_s:.1f}s, "
          f"{len(outcomes) - len(cases)} through the commands)")
    failures = [f"{o.name}: {o.problem}: {o.message}" for o in outcomes if o.problem]
    assert not failures, f"{len(failures)} of {len(outcomes)} hostile inputs:\n" + "\n".join(failures)
