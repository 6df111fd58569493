"""Tokenizers, text sources, step-indexed random windows (exact resume, process slices) and build_data."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from llm_jax import config as config_lib
from llm_jax.errors import ConfigError
from llm_jax.data import lm_batches
from llm_jax.data.pipeline import build_data
from llm_jax.data.sources import SOURCES
from llm_jax.data.tokenizers import TOKENIZER_FILE, ByteTokenizer, CharTokenizer, load_tokenizer

SEQ_LEN, BATCH = 16, 8


def _random_text(n=5000, seed=0, alphabet="abcdefghij klmnop\n"):
    return "".join(np.random.default_rng(seed).choice(list(alphabet), size=n))


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(_random_text(), encoding="utf-8")
    return path


def _config(path, **data):
    config = config_lib.default_config()
    # the windows sampler over whole files; the grain pipeline is tested in test_grain_pipeline.py
    config.data.update(path=str(path), seq_len=SEQ_LEN, pipeline="windows", split_by="file")
    config.data.update(**data)
    config.train.update(batch_size=BATCH)
    return config


# ----------------------------------------------------------------------------- tokenizers


def test_char_tokenizer_round_trip():
    text = "hello world\nthe quick brown fox"
    tokenizer = CharTokenizer.fit(text)
    assert tokenizer.chars == sorted(set(text)) and tokenizer.vocab_size == len(set(text))
    ids = tokenizer.encode(text)
    assert ids.dtype == np.int32 and ids.shape == (len(text),)
    assert ids.min() >= 0 and ids.max() < tokenizer.vocab_size
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode([int(i) for i in tokenizer.encode("fox")]) == "fox"
    # ids follow the sorted character order
    assert list(tokenizer.encode(" \n")) == [tokenizer.chars.index(" "), tokenizer.chars.index("\n")]


def test_char_tokenizer_rejects_unknown_characters_by_name():
    tokenizer = CharTokenizer.fit("abc")
    with pytest.raises(ValueError) as error:
        tokenizer.encode("abz!q")
    message = str(error.value)
    for char in ("z", "!", "q"):
        assert repr(char) in message, message
    assert "'a'" not in message


def test_byte_tokenizer_round_trip_including_non_ascii():
    text = "naïve café — 東京 🎉\n"
    tokenizer = ByteTokenizer.fit("anything")
    ids = tokenizer.encode(text)
    assert tokenizer.vocab_size == 256
    assert ids.dtype == np.int32 and len(ids) == len(text.encode("utf-8")) > len(text)
    assert ids.min() >= 0 and ids.max() < 256
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode([int(i) for i in ids]) == text
    # a cut multi-byte sequence decodes with a replacement character instead of failing
    assert tokenizer.decode(tokenizer.encode("é")[:1]) == "\ufffd"


@pytest.mark.parametrize("tokenizer", [CharTokenizer.fit("zyx é\n東"), ByteTokenizer()], ids=["char", "byte"])
def test_tokenizer_save_load_round_trip(tokenizer, tmp_path):
    directory = str(tmp_path / "tokenizer")
    tokenizer.save(directory)
    with open(os.path.join(directory, TOKENIZER_FILE), encoding="utf-8") as f:
        assert json.load(f)["kind"] == tokenizer.kind
    loaded = load_tokenizer(directory)
    assert type(loaded) is type(tokenizer)
    assert loaded.kind == tokenizer.kind and loaded.vocab_size == tokenizer.vocab_size
    text = "xyz é東\n"
    np.testing.assert_array_equal(loaded.encode(text), tokenizer.encode(text))
    assert loaded.decode(loaded.encode(text)) == text


def test_load_tokenizer_from_an_empty_directory_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(str(tmp_path))


# ----------------------------------------------------------------------------- random windows


def _stream(tokens=None, seed=0, **kwargs):
    tokens = np.arange(1000, dtype=np.int32) if tokens is None else tokens
    return lm_batches.RandomWindowStream(tokens, SEQ_LEN, BATCH, seed, **kwargs)


def _assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_stream_shapes_and_targets_are_inputs_shifted_by_one():
    tokens = np.random.default_rng(0).integers(0, 50, size=3000).astype(np.int32)
    chunk = _stream(tokens).next_chunk(3)
    assert chunk["inputs"].shape == chunk["targets"].shape == chunk["weights"].shape == (3, BATCH, SEQ_LEN)
    np.testing.assert_array_equal(chunk["weights"], 1.0)
    np.testing.assert_array_equal(chunk["inputs"][..., 1:], chunk["targets"][..., :-1])
    # with tokens = arange, a row's first input is its offset: the row must be tokens[o : o + T + 1]
    chunk = _stream().next_chunk(3)
    offsets = chunk["inputs"][..., :1]
    np.testing.assert_array_equal(chunk["inputs"], offsets + np.arange(SEQ_LEN))
    np.testing.assert_array_equal(chunk["targets"], offsets + 1 + np.arange(SEQ_LEN))
    assert offsets.max() + SEQ_LEN < 1000
    assert len(np.unique(offsets)) > 1  # random windows, not one repeated offset


def test_stream_same_seed_same_batches_other_seed_different():
    a, b, c = _stream(seed=1).next_chunk(4), _stream(seed=1).next_chunk(4), _stream(seed=2).next_chunk(4)
    _assert_batches_equal(a, b)
    assert not np.array_equal(a["inputs"], c["inputs"])
    # consecutive steps get different windows
    assert not np.array_equal(a["inputs"][0], a["inputs"][1])


def test_stream_chunking_does_not_change_the_sequence():
    whole = _stream().next_chunk(6)
    stream = _stream()
    parts = [stream.next_chunk(1), stream.next_chunk(2), stream.next_chunk(3)]
    np.testing.assert_array_equal(np.concatenate([p["inputs"] for p in parts]), whole["inputs"])
    assert stream.get_state() == {"next_step": 6, "seed": 0}


def test_stream_get_state_set_state_resumes_exactly():
    uninterrupted = _stream(seed=5)
    uninterrupted.next_chunk(3)
    expected = uninterrupted.next_chunk(4)

    first = _stream(seed=5)
    first.next_chunk(2)
    first.next_chunk(1)
    saved = json.loads(json.dumps(first.get_state()))  # checkpoints hold it as JSON
    assert saved == {"next_step": 3, "seed": 5}
    resumed = _stream(seed=5)
    resumed.set_state(saved)
    _assert_batches_equal(resumed.next_chunk(4), expected)
    # without the restore the fresh stream starts over and differs
    assert not np.array_equal(_stream(seed=5).next_chunk(4)["inputs"], expected["inputs"])


def test_stream_set_state_with_another_seed_raises():
    stream = _stream(seed=3)
    with pytest.raises(ValueError, match="data.seed"):
        stream.set_state({"next_step": 2, "seed": 4})
    assert stream.get_state()["next_step"] == 0


def test_stream_process_rows_partition_the_global_batch():
    full = _stream(seed=7).next_chunk(3)
    halves = [_stream(seed=7, rows=rows).next_chunk(3) for rows in ((0, BATCH // 2), (BATCH // 2, BATCH))]
    for half in halves:
        assert half["inputs"].shape == (3, BATCH // 2, SEQ_LEN)
    for key in full:
        np.testing.assert_array_equal(np.concatenate([h[key] for h in halves], axis=1), full[key], err_msg=key)
    # tokens = arange: the first input of a row is its offset, and the two processes read different rows
    assert not np.array_equal(halves[0]["inputs"], halves[1]["inputs"])


def test_stream_rejects_too_few_tokens():
    with pytest.raises(ValueError, match="seq_len"):
        _stream(tokens=np.arange(SEQ_LEN + 1, dtype=np.int32))


def test_fixed_windows_are_identical_on_every_call_and_sliced_by_process():
    tokens = np.arange(500, dtype=np.int32)
    first = list(lm_batches.fixed_windows(tokens, SEQ_LEN, BATCH, 0, 3))
    second = list(lm_batches.fixed_windows(tokens, SEQ_LEN, BATCH, 0, 3))
    assert len(first) == 3
    for a, b in zip(first, second):
        _assert_batches_equal(a, b)
        assert a["inputs"].shape == (BATCH, SEQ_LEN)
        np.testing.assert_array_equal(a["targets"], a["inputs"] + 1)
    assert not np.array_equal(first[0]["inputs"], first[1]["inputs"])
    other_seed = next(lm_batches.fixed_windows(tokens, SEQ_LEN, BATCH, 1, 1))
    assert not np.array_equal(other_seed["inputs"], first[0]["inputs"])
    halves = [list(lm_batches.fixed_windows(tokens, SEQ_LEN, BATCH, 0, 3, rows))
              for rows in ((0, BATCH // 2), (BATCH // 2, BATCH))]
    for i in range(3):
        np.testing.assert_array_equal(np.concatenate([halves[0][i]["inputs"], halves[1][i]["inputs"]]),
                                      first[i]["inputs"])
    # evaluation windows are not the training windows of the same seed
    train = _stream(tokens=tokens, seed=0).next_chunk(1)["inputs"][0]
    assert not np.array_equal(train, first[0]["inputs"])


# ----------------------------------------------------------------------------- sources


def _source_texts(config) -> dict[str, list[str]]:
    source = SOURCES.get(config.data.source)(config.data)
    return {split: [source.text_of(record) for record in records] for split, records in source.splits.items()}


def test_text_file_source_reads_utf8(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("héllo\nwörld", encoding="utf-8")
    assert _source_texts(_config(path)) == {"train": ["héllo\nwörld"]}
    assert _source_texts(_config(path, split_by="line")) == {"train": ["héllo", "wörld"]}
    evaluation = tmp_path / "e.txt"
    evaluation.write_text("a\n\nb c\nd\n", encoding="utf-8")
    assert _source_texts(_config(path, eval_path=str(evaluation), split_by="blank_line")) == {
        "train": ["héllo\nwörld"], "validation": ["a", "b c\nd"]}


@pytest.mark.parametrize("case", ["empty_path", "missing_file", "whitespace_only"])
def test_text_file_source_errors_name_data_path(case, tmp_path):
    if case == "empty_path":
        path = ""
    elif case == "missing_file":
        path = str(tmp_path / "does_not_exist.txt")
    else:
        path = tmp_path / "blank.txt"
        path.write_text("  \n\t\n  ")
    with pytest.raises(ConfigError, match="data.path|data.source='text_file'") as error:
        SOURCES.get("text_file")(_config(path).data)
    if case != "empty_path":
        assert str(path) in str(error.value) or os.path.basename(str(path)) in str(error.value)


def test_python_docs_source_is_a_large_corpus():
    texts = _source_texts(_config("", source="python_docs"))["train"]
    assert len(texts) > 50 and sum(map(len, texts)) > 100_000
    assert texts == _source_texts(_config("", source="python_docs"))["train"]  # deterministic


# ----------------------------------------------------------------------------- build_data


def test_build_data_splits_90_10(text_file, tmp_path):
    data = build_data(_config(text_file), tokenizer_dir=str(tmp_path / "tok"))
    all_tokens = data.tokenizer.encode(text_file.read_text(encoding="utf-8"))
    split = int(len(all_tokens) * 0.9)
    assert len(all_tokens) == 5000 and split == 4500
    train = data.train.tokens
    assert len(train) == split
    np.testing.assert_array_equal(train, all_tokens[:split])
    # validation batches are fixed windows over exactly all_tokens[split:]: their offsets depend on its length
    validation = list(data.eval_batches("validation", 2))
    expected = list(lm_batches.fixed_windows(all_tokens[split:], SEQ_LEN, BATCH, 0, 2))
    for got, want in zip(validation, expected, strict=True):
        _assert_batches_equal(got, want)
    assert len(train) + len(all_tokens[split:]) == len(all_tokens)
    # evaluation on the train split reads the train tokens
    for got, want in zip(data.eval_batches("train", 2), lm_batches.fixed_windows(train, SEQ_LEN, BATCH, 0, 2)):
        _assert_batches_equal(got, want)
    with pytest.raises(ValueError, match="unknown split"):
        data.eval_batches("test", 1)


def test_build_data_process_rows(text_file):
    full = build_data(_config(text_file)).train.next_chunk(2)["inputs"]
    halves = [build_data(_config(text_file), rows=rows) for rows in ((0, BATCH // 2), (BATCH // 2, BATCH))]
    np.testing.assert_array_equal(np.concatenate([h.train.next_chunk(2)["inputs"] for h in halves], axis=1), full)
    full_eval = next(build_data(_config(text_file)).eval_batches("validation", 1))["inputs"]
    np.testing.assert_array_equal(
        np.concatenate([next(h.eval_batches("validation", 1))["inputs"] for h in halves]), full_eval)


def test_build_data_saves_and_reloads_the_tokenizer(text_file, tmp_path):
    tokenizer_dir = str(tmp_path / "tok")
    first = build_data(_config(text_file), tokenizer_dir=tokenizer_dir)
    assert os.path.isfile(os.path.join(tokenizer_dir, TOKENIZER_FILE))
    assert load_tokenizer(tokenizer_dir).chars == first.tokenizer.chars == sorted(set(_random_text()))
    # A second run with the same directory loads the saved vocabulary instead of fitting a new one, even on a
    # text with fewer characters (a fresh fit would give a smaller vocabulary with different ids).
    other = tmp_path / "other.txt"
    other.write_text(_random_text(seed=1, alphabet="op\n") * 2)
    second = build_data(_config(other), tokenizer_dir=tokenizer_dir)
    assert second.tokenizer.chars == first.tokenizer.chars
    assert CharTokenizer.fit(other.read_text()).vocab_size < second.tokenizer.vocab_size
    np.testing.assert_array_equal(second.train.tokens[:50], first.tokenizer.encode(other.read_text()[:50]))


def test_build_data_with_mismatching_saved_tokenizer_raises(text_file, tmp_path):
    tokenizer_dir = str(tmp_path / "tok")
    build_data(_config(text_file, tokenizer="char"), tokenizer_dir=tokenizer_dir)
    with pytest.raises(ConfigError, match="data.tokenizer='byte'"):
        build_data(_config(text_file, tokenizer="byte"), tokenizer_dir=tokenizer_dir)


def test_build_data_byte_tokenizer(text_file):
    data = build_data(_config(text_file, tokenizer="byte"))
    assert data.tokenizer.vocab_size == 256
    np.testing.assert_array_equal(data.train.tokens, np.frombuffer(text_file.read_bytes()[:4500], np.uint8))


def test_shakespeare_char_recipe_reads_the_shared_corpus(tmp_path):
    """The measured recipe's data: 65 characters, nanoGPT's 90/10 split of 1,115,394 characters."""
    import importlib.util

    from conftest import REPO_ROOT, shared_data_file

    shared_data_file("tinyshakespeare.txt")
    spec = importlib.util.spec_from_file_location("shakespeare_char", REPO_ROOT / "experiments" / "shakespeare_char.py")
    experiment = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(experiment)
    data = build_data(experiment.get_config(), tokenizer_dir=str(tmp_path / "tokenizer"))
    assert data.tokenizer.vocab_size == 65
    assert len(data.train.tokens) == 1_003_854
    assert data.tokenizer.decode(data.train.tokens[:14]) == "First Citizen:"
