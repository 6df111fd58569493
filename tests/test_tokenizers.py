"""SentencePiece and GPT-2 BPE tokenizers: published ids, training, save/load round trips, clear errors."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import tiktoken.load
import tiktoken_ext.openai_public
from sentencepiece import sentencepiece_model_pb2

from conftest import shared_data_file
from llm_jax import config as config_lib
from llm_jax.errors import ConfigError
from llm_jax.data.tokenizers import (GPT2_PATTERN, NUM_SENTINELS, SPECIAL_TOKENS, TOKENIZER_FILE, TOKENIZERS,
                                     GPT2BPETokenizer, SentencePieceTokenizer, load_gpt2_ranks, load_tokenizer)

SAMPLES = ["hello world", "Hello, World!  Two  spaces,\ttabs\nand\n\nnewlines.\n", " leading and trailing ",
           "naïve café — 東京 🎉", "it's 2024: 3.14159 x10^3", ""]


def _data(**values) -> config_lib.ml_collections.ConfigDict:
    data = config_lib.default_config().data
    data.update(**values)
    return data


def _assert_round_trips(tokenizer, texts=SAMPLES) -> None:
    for text in texts:
        ids = tokenizer.encode(text)
        assert ids.dtype == np.int32 and ids.ndim == 1, text
        assert ids.size == 0 or (ids.min() >= 0 and ids.max() < tokenizer.vocab_size), text
        assert tokenizer.decode(ids) == text
        assert tokenizer.decode([int(i) for i in ids]) == text


@pytest.fixture(scope="module")
def botchan() -> str:
    return shared_data_file("botchan.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def gpt2_path() -> str:
    return str(shared_data_file("gpt2.tiktoken"))


@pytest.fixture(scope="module")
def gpt2(gpt2_path) -> GPT2BPETokenizer:
    return GPT2BPETokenizer.fit("unused: GPT-2's merges are fixed", _data(tokenizer_path=gpt2_path))


@pytest.fixture(scope="module", params=["unigram", "bpe"])
def model_type(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def trained(model_type, botchan) -> SentencePieceTokenizer:
    return SentencePieceTokenizer.fit(botchan, _data(sentencepiece_model_type=model_type, tokenizer_vocab_size=500))


def test_new_tokenizers_are_registered_and_validate():
    assert {"char", "byte", "sentencepiece", "gpt2_bpe"} <= set(TOKENIZERS.names())
    config = config_lib.default_config()
    config.data.tokenizer = "sentencepiece"
    config_lib.validate(config, num_devices=1)


# ----------------------------------------------------------------------------- published ids


def test_published_sentencepiece_model_ids():
    path = str(shared_data_file("botchan_unigram_1000.model"))
    tokenizer = SentencePieceTokenizer.fit("unused: the model is loaded, not trained", _data(tokenizer_path=path))
    assert tokenizer.kind == "sentencepiece" and tokenizer.vocab_size == 1000
    ids = tokenizer.encode("hello world")
    assert ids.dtype == np.int32 and ids.tolist() == [39, 88, 21, 887]
    assert tokenizer.decode(ids) == "hello world"
    assert tokenizer.special_ids == {"unk": 0, "bos": 1, "eos": 2}  # its authors declared no pad


def test_gpt2_published_ids(gpt2):
    assert gpt2.kind == "gpt2_bpe" and gpt2.vocab_size == 50257 and gpt2.eot_id == 50256
    assert gpt2.encode("hello world").tolist() == [31373, 995]
    assert gpt2.decode([31373, 995]) == "hello world"
    assert GPT2_PATTERN == tiktoken_ext.openai_public.r50k_pat_str  # tiktoken's own "gpt2" encoding
    _assert_round_trips(gpt2)


def test_gpt2_ranks_parse_like_tiktoken(gpt2_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # tiktoken's own loader, without its file cache
    with open(gpt2_path, "rb") as f:
        assert load_gpt2_ranks(gpt2_path, f.read()) == tiktoken.load.load_tiktoken_bpe(gpt2_path)


def test_gpt2_endoftext_is_one_special_id(gpt2):
    text = "first document<|endoftext|>second document"
    ids = gpt2.encode(text).tolist()
    assert ids.count(50256) == 1 and gpt2.encode("hello world<|endoftext|>").tolist() == [31373, 995, 50256]
    assert gpt2.decode(ids) == text
    assert gpt2.decode([50256]) == "<|endoftext|>"
    # a multi-byte character cut in half decodes with a replacement character instead of failing
    assert gpt2.decode(gpt2.encode("東")[:1]) == "\ufffd"


# ----------------------------------------------------------------------------- training


def test_trained_sentencepiece_vocab_round_trip_and_special_ids(trained, botchan):
    assert trained.kind == "sentencepiece" and trained.vocab_size == 500
    _assert_round_trips(trained, SAMPLES + [botchan[:20000]])
    declared = {name: i for i, name in enumerate(SPECIAL_TOKENS)}
    assert trained.special_ids == declared
    assert declared["pad"] == 0 and list(declared)[:4] == ["pad", "unk", "bos", "eos"]
    for name in ("mask", "cls", "sep", "sentinel_0", f"sentinel_{NUM_SENTINELS - 1}"):
        assert trained.decode([declared[name]]) == SPECIAL_TOKENS[name]
    ids = trained.encode("a <mask> b").tolist()
    assert declared["mask"] in ids and trained.decode(ids) == "a <mask> b"
    assert trained.encode("text").size > 0  # ordinary text does not hit the unknown piece
    assert declared["unk"] not in trained.encode("東京 🎉 \x00").tolist()  # byte fallback


def test_trained_model_follows_the_config_and_is_deterministic(trained, model_type, botchan):
    spec = sentencepiece_model_pb2.ModelProto.FromString(trained.model_proto).trainer_spec
    assert sentencepiece_model_pb2.TrainerSpec.ModelType.Name(spec.model_type) == model_type.upper()
    assert spec.vocab_size == 500 and spec.byte_fallback and spec.character_coverage == 1.0
    again = SentencePieceTokenizer.fit(botchan, _data(sentencepiece_model_type=model_type, tokenizer_vocab_size=500))
    assert again.model_proto == trained.model_proto  # every process fits the same model


# ----------------------------------------------------------------------------- save / load


def _assert_save_load_round_trip(tokenizer, directory: str, model_file: str, lossless: bool = True) -> None:
    tokenizer.save(directory)
    assert sorted(os.listdir(directory)) == sorted([TOKENIZER_FILE, model_file])
    with open(os.path.join(directory, TOKENIZER_FILE), encoding="utf-8") as f:
        assert json.load(f)["kind"] == tokenizer.kind
    loaded = load_tokenizer(directory)
    assert type(loaded) is type(tokenizer) and loaded.vocab_size == tokenizer.vocab_size
    for text in SAMPLES + ["<|endoftext|> <mask>"]:
        np.testing.assert_array_equal(loaded.encode(text), tokenizer.encode(text))
        assert loaded.decode(loaded.encode(text)) == tokenizer.decode(tokenizer.encode(text))
    if lossless:
        _assert_round_trips(loaded)


def test_trained_sentencepiece_save_load_round_trip(trained, tmp_path):
    _assert_save_load_round_trip(trained, str(tmp_path / "tokenizer"), "spm.model")
    assert load_tokenizer(str(tmp_path / "tokenizer")).special_ids == trained.special_ids


def test_loaded_sentencepiece_save_is_self_contained(tmp_path):
    model = tmp_path / "copy.model"
    shutil.copy(shared_data_file("botchan_unigram_1000.model"), model)
    tokenizer = SentencePieceTokenizer.fit("", _data(tokenizer_path=str(model)))
    model.unlink()  # DIR/tokenizer must not need the original file
    # its authors' model normalises whitespace (NFKC, no newlines), so only the ids are compared
    _assert_save_load_round_trip(tokenizer, str(tmp_path / "tokenizer"), "spm.model", lossless=False)
    assert load_tokenizer(str(tmp_path / "tokenizer")).encode("hello world").tolist() == [39, 88, 21, 887]


def test_gpt2_save_copies_the_ranks_file(gpt2_path, tmp_path):
    ranks = tmp_path / "ranks.tiktoken"
    shutil.copy(gpt2_path, ranks)
    tokenizer = GPT2BPETokenizer.fit("", _data(tokenizer_path=str(ranks)))
    ranks.unlink()
    _assert_save_load_round_trip(tokenizer, str(tmp_path / "tokenizer"), "gpt2.tiktoken")
    assert load_tokenizer(str(tmp_path / "tokenizer")).encode("hello world").tolist() == [31373, 995]


# ----------------------------------------------------------------------------- errors


def test_sentencepiece_missing_or_unreadable_model_names_key_and_file(tmp_path, botchan):
    missing = str(tmp_path / "nope.model")
    with pytest.raises(ConfigError, match=r"data\.tokenizer_path=.*nope\.model.*no such file"):
        SentencePieceTokenizer.fit(botchan, _data(tokenizer_path=missing))
    for name, payload in (("text.model", b"this is not a model"), ("empty.model", b"")):
        (tmp_path / name).write_bytes(payload)
        with pytest.raises(ConfigError, match=rf"data\.tokenizer_path=.*{name}.*not a SentencePiece model"):
            SentencePieceTokenizer.fit(botchan, _data(tokenizer_path=str(tmp_path / name)))


def test_sentencepiece_vocab_size_errors_name_the_key(botchan):
    # the default 8192 (data=None reads the defaults) is more than botchan.txt can give a unigram model
    with pytest.raises(ConfigError, match=r"data\.tokenizer_vocab_size=8192 is too large.*at most \d+.*lower"):
        SentencePieceTokenizer.fit(botchan)
    with pytest.raises(ConfigError, match=r"data\.tokenizer_vocab_size=100 is smaller.*raise"):
        SentencePieceTokenizer.fit(botchan[:5000], _data(tokenizer_vocab_size=100))
    with pytest.raises(ConfigError, match=r"data\.sentencepiece_model_type='word2vec'"):
        SentencePieceTokenizer.fit(botchan, _data(sentencepiece_model_type="word2vec"))
    with pytest.raises(ConfigError, match="no text"):
        SentencePieceTokenizer.fit("\n\n", _data(tokenizer_vocab_size=500))


def test_gpt2_bad_ranks_file_names_key_and_file(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.tokenizer_path is empty.*gpt2\.tiktoken"):
        GPT2BPETokenizer.fit("text")
    with pytest.raises(ConfigError, match=r"data\.tokenizer_path=.*missing\.tiktoken.*no such file"):
        GPT2BPETokenizer.fit("text", _data(tokenizer_path=str(tmp_path / "missing.tiktoken")))
    garbage = tmp_path / "garbage.tiktoken"
    garbage.write_text("not a ranks file at all\n")
    with pytest.raises(ConfigError, match=r"garbage\.tiktoken.*not a tiktoken ranks file \(line 1"):
        GPT2BPETokenizer.fit("text", _data(tokenizer_path=str(garbage)))
    short = tmp_path / "short.tiktoken"
    short.write_text("YQ== 0\nYg== 1\n")
    with pytest.raises(ConfigError, match=r"short\.tiktoken.*holds 2 ranks, not GPT-2's 50256"):
        GPT2BPETokenizer.fit("text", _data(tokenizer_path=str(short)))


def test_damaged_tokenizer_directory_names_the_file(gpt2, tmp_path):
    directory = tmp_path / "tokenizer"
    gpt2.save(str(directory))
    ranks = directory / "gpt2.tiktoken"
    ranks.write_bytes(ranks.read_bytes().replace(b"IQ== 0", b"Ig== 0"))
    with pytest.raises(ValueError, match=r"gpt2\.tiktoken changed since tokenizer\.json was written"):
        load_tokenizer(str(directory))
    ranks.unlink()
    with pytest.raises(FileNotFoundError, match=r"gpt2\.tiktoken"):
        load_tokenizer(str(directory))


def test_decode_rejects_ids_outside_the_vocabulary(gpt2):
    path = str(shared_data_file("botchan_unigram_1000.model"))
    spm = SentencePieceTokenizer.fit("", _data(tokenizer_path=path))
    for tokenizer, bad in ((gpt2, 50257), (spm, 1000), (spm, -1)):
        with pytest.raises(ValueError, match=rf"\[{bad}\] are outside the tokenizer's vocabulary"):
            tokenizer.decode([1, bad])


def test_pipeline_passes_the_data_section_to_the_tokenizer(tmp_path):
    """build_data trains the configured SentencePiece model and saves it with the run."""
    from llm_jax import config as config_lib
    from llm_jax.data.pipeline import build_data
    from llm_jax.data.tokenizers import load_tokenizer

    config = config_lib.default_config()
    config.data.update(path=str(shared_data_file("botchan.txt")), tokenizer="sentencepiece",
                       tokenizer_vocab_size=400, sentencepiece_model_type="bpe", split_by="line")
    data = build_data(config, tokenizer_dir=str(tmp_path / "tokenizer"))
    assert data.tokenizer.vocab_size == 400
    reloaded = load_tokenizer(str(tmp_path / "tokenizer"))
    np.testing.assert_array_equal(reloaded.encode("It was a fine day."), data.tokenizer.encode("It was a fine day."))
