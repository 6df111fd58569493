"""`python -m llm_jax.data`: prepare -> train-tokenizer -> inspect / stats, and actionable errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, shared_data_file, subprocess_env

TRAIN_PARAGRAPHS = 150  # over two files
VALIDATION_PARAGRAPHS = 20


def run_data(*args: str, timeout: int = 120, cwd=REPO_ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llm_jax.data", *map(str, args)], cwd=cwd,
                          env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


def ok(*args: str, cwd=REPO_ROOT) -> str:
    result = run_data(*args, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Botchan's lines as paragraphs of 1-3 lines (blank-line separated): two train files, one validation file."""
    lines = [line.strip() for line in shared_data_file("botchan.txt").read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines[1:] if line and line.isascii()]
    paragraphs, start = [], 0
    for i in range(TRAIN_PARAGRAPHS + VALIDATION_PARAGRAPHS):
        size = 1 + i % 3
        paragraphs.append("\n".join(lines[start:start + size]))
        start += size
    root = tmp_path_factory.mktemp("data_cli")
    half = TRAIN_PARAGRAPHS // 2
    for name, chunk in (("a.txt", paragraphs[:half]), ("b.txt", paragraphs[half:TRAIN_PARAGRAPHS]),
                        ("valid.txt", paragraphs[TRAIN_PARAGRAPHS:])):
        (root / "src").mkdir(exist_ok=True)
        (root / "src" / name).write_text("\n\n".join(chunk) + "\n", encoding="utf-8")
    data_dir = root / "datasets"
    out = ok("prepare", "--kind=text", f"--paths={root / 'src' / '[ab].txt'}", "--split_by=blank_line",
             f"--validation_paths={root / 'src' / 'valid.txt'}", f"--data_dir={data_dir}", "--name=botchan")
    tokenizer_dir = root / "tokenizer"
    tok_out = ok("train-tokenizer", f"--data_dir={data_dir}", "--name=botchan", "--tokenizer=sentencepiece",
                 "--vocab_size=400", "--model_type=unigram", f"--output_dir={tokenizer_dir}")
    return dict(root=root, data_dir=data_dir, tokenizer_dir=tokenizer_dir, text="\n".join(paragraphs),
                prepare_out=out, tokenizer_out=tok_out)


def test_prepare_reports_directory_and_counts(corpus):
    out = corpus["prepare_out"]
    assert f"train: {TRAIN_PARAGRAPHS} records" in out
    assert f"validation: {VALIDATION_PARAGRAPHS} records" in out
    assert "skipped: 0 bad records" in out
    assert str(corpus["data_dir"] / "botchan") in out
    assert "Downloading" not in out  # TFDS's progress lines go to stderr


def test_train_tokenizer_saves_and_shows_a_sample(corpus):
    out = corpus["tokenizer_out"]
    assert "vocab size: 400" in out
    assert (corpus["tokenizer_dir"] / "tokenizer.json").exists()
    sample = json.loads(re.search(r"sample: (\".*\")", out).group(1))
    assert json.loads(re.search(r"decoded: (\".*\")", out).group(1)) == sample


def test_inspect_shows_packed_segments_with_source_text(corpus):
    out = ok("inspect", f"--data_dir={corpus['data_dir']}", "--name=botchan",
             f"--tokenizer_dir={corpus['tokenizer_dir']}", "--seq_len=256", "--num_examples=3", "--max_chars=50")
    assert out.count("example ") >= 3 and "segment 2:" in out, out
    shown = re.findall(r"segment (\d+): tokens \d+-\d+, positions 0-(\d+): (\".*\")", out)
    assert len(shown) >= 4, out
    for _, _, text in shown:
        decoded = json.loads(text)
        assert decoded and decoded in corpus["text"], decoded


def test_stats_counts_documents_per_split(corpus):
    out = ok("stats", f"--data_dir={corpus['data_dir']}", "--name=botchan")
    assert re.search(rf"train: {TRAIN_PARAGRAPHS} documents, \d+ characters", out), out
    assert re.search(rf"validation: {VALIDATION_PARAGRAPHS} documents", out), out
    with_tokens = ok("stats", f"--data_dir={corpus['data_dir']}", "--name=botchan",
                     f"--tokenizer_dir={corpus['tokenizer_dir']}")
    assert re.search(rf"train: {TRAIN_PARAGRAPHS} documents, \d+ tokens; tokens per document: mean", with_tokens)


def test_missing_dataset_and_tokenizer_say_what_to_run(corpus, tmp_path):
    result = run_data("stats", f"--data_dir={tmp_path}", "--name=nothing_here")
    assert result.returncode != 0
    assert "never prepared" in result.stderr and "python -m llm_jax.data prepare" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_data("inspect", f"--data_dir={corpus['data_dir']}", "--name=botchan",
                      f"--tokenizer_dir={tmp_path / 'no_tokenizer'}")
    assert result.returncode != 0
    assert "no tokenizer in" in result.stderr and "train-tokenizer" in result.stderr
    result = run_data("frobnicate")
    assert result.returncode != 0 and "give a command first" in result.stderr


def test_inspect_config_shows_the_first_training_rows_of_the_pipeline(tmp_path):
    """`inspect --config` builds the experiment's own pipeline: first-fit rows with several documents each."""
    path = tmp_path / "short_lines.txt"
    path.write_text("".join(f"line {i} is short\n" for i in range(100)))
    out = ok("inspect", "--config=experiments/python_docs.py:quick", f"--config.data.path={path}",
             "--config.data.source=text_file", "--config.data.split_by=line", "--config.data.packing=first_fit",
             "--config.data.tokenizer=byte", "--config.data.seq_len=32", "--num_examples=3", "--max_chars=200")
    lines = out.splitlines()
    assert lines[0].startswith("data.source='text_file' pipeline='grain' objective='causal_lm' packing='first_fit'")
    assert "batch (8, 32)" in lines[0]
    assert len([line for line in lines if line.startswith("example ")]) == 3
    segments = [line for line in lines if line.startswith("  segment ")]
    assert len(segments) >= 6, "first-fit rows of 32 bytes hold two lines of about 16 bytes"
    assert all(re.search(r"positions 0-\d+: \"line \d+ is", line) for line in segments), \
        "every segment is one document from its start: positions restart at 0"


def test_a_dataset_prepared_with_a_relative_data_dir_is_found_from_any_directory(tmp_path):
    """latest.json must not hold a path relative to the working directory `prepare` ran in."""
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir()
    elsewhere.mkdir()
    (here / "c.txt").write_text("first paragraph\n\nsecond paragraph\n", encoding="utf-8")
    ok("prepare", "--kind=text", "--paths=c.txt", "--split_by=blank_line", "--data_dir=data", "--name=c", cwd=here)
    assert "train: 2 documents" in ok("stats", "--data_dir=../here/data", "--name=c", cwd=elsewhere)
    ok("train-tokenizer", "--data_dir=../here/data", "--name=c", "--tokenizer=byte", "--output_dir=tok", cwd=elsewhere)
    out = ok("inspect", f"--data_dir={here / 'data'}", "--name=c", "--tokenizer_dir=tok", "--seq_len=64",
             cwd=elsewhere)
    assert 'segment 1: tokens 0-14, positions 0-14: "first paragraph"' in out, out


def test_a_failed_prepare_leaves_no_dataset_directory_and_a_later_one_works(tmp_path):
    """A bad record half-way (in the second file) fails the prepare: nothing of the dataset is left behind."""
    (tmp_path / "a.txt").write_text("fine\n", encoding="utf-8")
    (tmp_path / "b.txt").write_bytes(b"fine\n\nnot UTF-8: \xff\n")
    data_dir = tmp_path / "data"
    for paths in ("a.txt,b.txt", "a.txt,missing.txt"):
        result = run_data("prepare", "--kind=text", f"--paths={paths}", "--split_by=blank_line", "--data_dir=data",
                          "--name=c", cwd=tmp_path)
        assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
        assert not data_dir.exists(), sorted(str(p.relative_to(tmp_path)) for p in data_dir.rglob("*"))
    (tmp_path / "b.txt").write_text("fine\n\nnow fixed\n", encoding="utf-8")
    out = ok("prepare", "--kind=text", "--paths=a.txt,b.txt", "--split_by=blank_line", "--data_dir=data", "--name=c",
             cwd=tmp_path)
    assert "train: 3 records" in out, out
    prepared = sorted(p.name for p in (data_dir / "c").iterdir())
    (tmp_path / "b.txt").write_bytes(b"broken again: \xff\n")
    result = run_data("prepare", "--kind=text", "--paths=a.txt,b.txt", "--split_by=blank_line", "--data_dir=data",
                      "--name=c", cwd=tmp_path)
    assert result.returncode != 0 and "invalid UTF-8" in result.stderr, result.stderr[-3000:]
    assert sorted(p.name for p in (data_dir / "c").iterdir()) == prepared, "the prepared dataset is kept as it was"
