"""Local text sources -> prepared TFDS array_record datasets, read back without TensorFlow."""

from __future__ import annotations

import json
import os
import sys
import traceback

import pytest

from conftest import import_or_fail  # noqa: E402

import_or_fail("tensorflow_datasets")
import_or_fail("array_record")

from conftest import shared_data_file  # noqa: E402

from llm_jax.data.tfds_sources import LocalSource, data_source, prepare, skipped_records  # noqa: E402


def _no_tensorflow():
    loaded = sorted(m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow."))
    assert not loaded, f"TensorFlow was imported: {loaded[:5]}"


class _TensorflowImportSpy:
    """A meta-path finder that records attempts to import tensorflow (even ones tfds would catch).

    `importlib.util.find_spec("tensorflow")` is only a probe (etils' `epath` asks once whether TF is
    installed, to pick its file backend) and is not counted.
    """

    def __init__(self):
        self.attempts = []

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "tensorflow" or fullname.startswith("tensorflow."):
            probe = any(
                frame.name == "find_spec" and "importlib" in frame.filename and "util" in frame.filename
                for frame in traceback.extract_stack()
            )
            if not probe:
                self.attempts.append(fullname)
        return None


@pytest.fixture(autouse=True)
def _check_no_tensorflow():
    spy = _TensorflowImportSpy()
    sys.meta_path.insert(0, spy)
    try:
        yield
    finally:
        sys.meta_path.remove(spy)
    _no_tensorflow()
    assert not spy.attempts, f"something tried to import TensorFlow: {spy.attempts[:5]}"


def _write(path, content):
    mode = "wb" if isinstance(content, bytes) else "w"
    with open(path, mode, **({} if mode == "wb" else {"encoding": "utf-8", "newline": ""})) as f:
        f.write(content)
    return str(path)


def _records(data_dir, name, split="train"):
    source = data_source(str(data_dir), name, split)
    records = [source[i] for i in range(len(source))]
    assert list(source) == records
    return records


def _tree_mtimes(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        for file in files:
            path = os.path.join(dirpath, file)
            if not file.endswith("latest.json"):
                out[path] = os.stat(path).st_mtime_ns
    return out


# ----------------------------------------------------------------------------------------------------
# Round trips


@pytest.fixture
def text_files(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _write(src / "b.txt", "second file, line one\nline two\n\n\n  \nlast paragraph é\n")
    _write(src / "a.txt", "first file ünïcode\r\n\r\nparagraph two\r\n")
    return src


def test_text_split_by_file(tmp_path, text_files):
    prepare(LocalSource("text", (str(text_files / "*.txt"),)), str(tmp_path / "data"), name="docs")
    assert _records(tmp_path / "data", "docs") == [
        {"text": "first file ünïcode\r\n\r\nparagraph two\r\n"},
        {"text": "second file, line one\nline two\n\n\n  \nlast paragraph é\n"},
    ]


def test_text_split_by_blank_line(tmp_path, text_files):
    source = LocalSource("text", (str(text_files / "b.txt"), str(text_files / "a.txt")), split_by="blank_line")
    prepare(source, str(tmp_path / "data"), name="paras")
    assert _records(tmp_path / "data", "paras") == [
        {"text": "first file ünïcode"},
        {"text": "paragraph two"},
        {"text": "second file, line one\nline two"},
        {"text": "last paragraph é"},
    ]


def test_text_split_by_line(tmp_path, text_files):
    prepare(LocalSource("text", (str(text_files / "*.txt"),), split_by="line"), str(tmp_path / "data"), name="lines")
    assert _records(tmp_path / "data", "lines") == [
        {"text": t}
        for t in ["first file ünïcode", "paragraph two", "second file, line one", "line two", "last paragraph é"]
    ]


def test_jsonl_round_trip_and_splits(tmp_path):
    train = _write(tmp_path / "train.jsonl", '{"body": "one", "id": 1}\n\n{"body": "two\\nlines \\u00e9"}\n')
    test = _write(tmp_path / "test.jsonl", '{"body": "three"}')
    builder = prepare(
        LocalSource("jsonl", (train,), text_field="body"),
        str(tmp_path / "data"),
        splits={"test": LocalSource("jsonl", (test,), text_field="body")},
        name="j",
    )
    assert set(builder.info.splits) == {"train", "test"}
    assert _records(tmp_path / "data", "j") == [{"text": "one"}, {"text": "two\nlines é"}]
    assert _records(tmp_path / "data", "j", "test") == [{"text": "three"}]
    with pytest.raises(ValueError, match="no split 'validation'"):
        data_source(str(tmp_path / "data"), "j", "validation")


def test_tsv_with_labels(tmp_path):
    path = _write(tmp_path / "l.tsv", 'id\tsentence\tlabel\n7\tgood "quoted" film\tpos\n8\tbad one\tneg\n9\tmeh\tpos\n')
    source = LocalSource("tsv", (path,), text_columns=("sentence",), label_column="label", labels=("neg", "pos"))
    builder = prepare(source, str(tmp_path / "data"), name="l")
    assert builder.info.features["label"].names == ["neg", "pos"]
    assert _records(tmp_path / "data", "l") == [
        {"text": 'good "quoted" film', "label": 1},
        {"text": "bad one", "label": 0},
        {"text": "meh", "label": 1},
    ]


def test_tsv_sentence_pairs_without_header(tmp_path):
    path = _write(tmp_path / "p.tsv", "a cat\tun chat\tyes\nthe dog\t\tno\n")
    source = LocalSource(
        "tsv", (path,), text_columns=("0", "1"), label_column="2", labels=("no", "yes"), has_header=False
    )
    prepare(source, str(tmp_path / "data"), name="pairs")
    assert _records(tmp_path / "data", "pairs") == [
        {"text": "a cat", "text_b": "un chat", "label": 1},
        {"text": "the dog", "text_b": "", "label": 0},
    ]


# ----------------------------------------------------------------------------------------------------
# Prepared once, prepared again when the source changes


def test_prepare_reuses_and_reprepares_after_change(tmp_path):
    path = _write(tmp_path / "c.txt", "alpha\nbeta\n")
    source = LocalSource("text", (path,), split_by="line")
    data_dir = str(tmp_path / "data")

    first = prepare(source, data_dir, name="c")
    before = _tree_mtimes(os.path.join(data_dir, "c"))
    assert any("array_record" in p for p in before)

    second = prepare(source, data_dir, name="c")
    assert os.fspath(second.data_path) == os.fspath(first.data_path)
    assert _tree_mtimes(os.path.join(data_dir, "c")) == before  # nothing rewritten, nothing added
    assert _records(data_dir, "c") == [{"text": "alpha"}, {"text": "beta"}]

    _write(tmp_path / "c.txt", "alpha\nbeta\ngamma\n")
    third = prepare(source, data_dir, name="c")
    assert os.fspath(third.data_path) != os.fspath(first.data_path)
    assert _records(data_dir, "c") == [{"text": "alpha"}, {"text": "beta"}, {"text": "gamma"}]
    # options are part of the fingerprint too
    fourth = prepare(LocalSource("text", (path,), split_by="file"), data_dir, name="c")
    assert len({os.fspath(b.data_path) for b in (first, third, fourth)}) == 3
    assert _records(data_dir, "c") == [{"text": "alpha\nbeta\ngamma\n"}]


def test_data_source_before_prepare(tmp_path):
    with pytest.raises(FileNotFoundError, match="never prepared"):
        data_source(str(tmp_path), "nothing", "train")


# ----------------------------------------------------------------------------------------------------
# Bad input: raise naming file and line, or skip and count


BAD_CASES = {
    "empty_file": (LocalSource, {"kind": "text"}, b"", 1, "empty"),
    "whitespace_file": (LocalSource, {"kind": "text", "split_by": "line"}, b" \n\n", 1, "empty"),
    "bad_utf8_file": (
        LocalSource,
        {"kind": "text"},
        b"ok line\nsecond \xff line\n",
        2,
        "invalid UTF-8 at byte offset 15",
    ),
    "bad_utf8_para": (
        LocalSource,
        {"kind": "text", "split_by": "blank_line"},
        b"p1\n\np2 a\np2 \xc3\n",
        4,
        "invalid UTF-8 at byte offset 12",
    ),
    "bad_utf8_jsonl": (LocalSource, {"kind": "jsonl"}, b'{"text": "a"}\n{"text": "\xe9"}\n', 2, "byte offset 24"),
    "jsonl_not_json": (LocalSource, {"kind": "jsonl"}, b'{"text": "a"}\n\n{"text": \n', 3, "not valid JSON"),
    "jsonl_missing_field": (
        LocalSource,
        {"kind": "jsonl"},
        b'{"text": "a"}\n{"body": "b"}\n',
        2,
        "lacks the field 'text'",
    ),
    "jsonl_not_object": (LocalSource, {"kind": "jsonl"}, b'{"text": "a"}\n["text"]\n', 2, "expected a JSON object"),
    "jsonl_not_string": (LocalSource, {"kind": "jsonl"}, b'{"text": "a"}\n{"text": 3}\n', 2, "not a string"),
    "tsv_columns": (
        LocalSource,
        {"kind": "tsv", "label_column": "label", "labels": ("0", "1")},
        b"text\tlabel\na\t1\nb\t0\textra\n",
        3,
        "3 columns, expected 2",
    ),
    "tsv_label": (
        LocalSource,
        {"kind": "tsv", "label_column": "label", "labels": ("0", "1")},
        b"text\tlabel\na\t1\nb\t2\n",
        3,
        "unknown label '2'",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_raises_with_file_and_line(tmp_path, case):
    cls, options, content, line, message = BAD_CASES[case]
    path = _write(tmp_path / f"{case}.dat", content)
    with pytest.raises(ValueError) as excinfo:
        prepare(cls(paths=(path,), **options), str(tmp_path / "data"), name=case)
    text = str(excinfo.value)
    assert text.startswith(f"{path}:{line}: "), text
    assert message in text
    # no half-prepared dataset is left to be read
    with pytest.raises(FileNotFoundError):
        data_source(str(tmp_path / "data"), case, "train")


def test_skip_bad_records_counts(tmp_path):
    content = "text\tlabel\nfine\t1\nbad label\t7\ntoo\tmany\tcells\nalso fine\t0\n\xff\t1\n"
    good = _write(tmp_path / "a.tsv", content.encode("latin-1"))
    empty = _write(tmp_path / "b.tsv", b"")
    source = LocalSource("tsv", (good, empty), label_column="label", labels=("0", "1"))
    with pytest.raises(ValueError, match=rf"^{good}:3: unknown label '7'"):
        prepare(source, str(tmp_path / "data"), name="s")

    builder = prepare(source, str(tmp_path / "data"), name="s", skip_bad_records=True)
    assert skipped_records(builder) == 4  # bad label, bad column count, bad UTF-8, empty file
    metadata = builder.info.metadata
    assert metadata["skipped_by_split"] == {"train": 4}
    assert metadata["reasons"][0].startswith(f"{good}:3: unknown label")
    assert any(r.startswith(f"{empty}:1: ") for r in metadata["reasons"])
    with open(os.path.join(os.fspath(builder.data_path), "metadata.json")) as f:
        assert json.load(f)["skipped_records"] == 4
    assert _records(tmp_path / "data", "s") == [{"text": "fine", "label": 1}, {"text": "also fine", "label": 0}]
    # the count survives reuse
    again = prepare(source, str(tmp_path / "data"), name="s", skip_bad_records=True)
    assert os.fspath(again.data_path) == os.fspath(builder.data_path)
    assert skipped_records(again) == 4


def test_all_records_skipped_raises(tmp_path):
    path = _write(tmp_path / "x.jsonl", b'{"body": 1}\n')
    with pytest.raises(ValueError, match="split 'train': no records in .*1 bad records skipped"):
        prepare(LocalSource("jsonl", (path,)), str(tmp_path / "data"), name="x", skip_bad_records=True)
    leftovers = [d for _, dirs, _ in os.walk(tmp_path / "data") for d in dirs if d.startswith("incomplete")]
    assert not leftovers


def test_bad_options():
    with pytest.raises(ValueError, match="kind"):
        LocalSource("csv", ("x",))
    with pytest.raises(ValueError, match="split_by"):
        LocalSource("text", ("x",), split_by="page")
    with pytest.raises(ValueError, match="go together"):
        LocalSource("tsv", ("x",), label_column="label")
    with pytest.raises(ValueError, match="no such file"):
        prepare(LocalSource("text", ("/nonexistent/file.txt",)), "/tmp", name="x")


def test_missing_column_names_the_header(tmp_path):
    path = _write(tmp_path / "h.tsv", "sentence\tlabel\na\t1\n")
    with pytest.raises(ValueError, match=rf"^{path}:1: column 'text' is not in the header"):
        prepare(LocalSource("tsv", (path,)), str(tmp_path / "data"), name="h")


# ----------------------------------------------------------------------------------------------------
# The project's shared data


def test_sst2_dev(tmp_path):
    path = shared_data_file("sst2_dev.tsv")
    source = LocalSource("tsv", (str(path),), text_columns=("sentence",), label_column="label", labels=("0", "1"))
    prepare(source, str(tmp_path / "data"), name="sst2")
    records = data_source(str(tmp_path / "data"), "sst2", "train")
    assert len(records) == 6735
    with open(path, encoding="utf-8") as f:
        rows = [line.rstrip("\n").split("\t") for line in f][1:]
    for i in (0, 1, 3000, 6734, -1):
        assert records[i] == {"text": rows[i][0], "label": int(rows[i][1])}
    assert {r["label"] for r in records} == {0, 1}


def test_sms_spam(tmp_path):
    path = shared_data_file("sms_spam.tsv")
    source = LocalSource(
        "tsv", (str(path),), text_columns=("1",), label_column="0", labels=("ham", "spam"), has_header=False
    )
    prepare(source, str(tmp_path / "data"), name="sms")
    records = data_source(str(tmp_path / "data"), "sms", "train")
    assert len(records) == 5574
    assert records[0]["label"] == 0 and records[0]["text"].startswith("Go until jurong point")
    assert records[2]["label"] == 1 and records[2]["text"].startswith("Free entry in 2 a wkly comp")
    assert sum(r["label"] for r in records) > 0
