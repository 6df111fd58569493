"""Tokenizers behind one interface, selected by `data.tokenizer` and saved under DIR/tokenizer/.

Every tokenizer class has two constructors: `fit(text, data=None)` learns from (or, for file-backed kinds,
loads for) the training text, reading its options from `data` (`config.data`; the defaults when None), and
`from_spec(spec, directory)` rebuilds what `save(directory)` wrote. `save` writes every file the tokenizer
needs next to tokenizer.json, so DIR/tokenizer alone reproduces the ids of a run.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
from typing import Iterator, Protocol, Sequence

import ml_collections
import numpy as np
import sentencepiece
import tiktoken
import tokenizers as hf_tokenizers

from llm_jax.config import ConfigError, default_config
from llm_jax.errors import UserError
from llm_jax.registry import Registry

TOKENIZER_FILE = "tokenizer.json"


class TokenizerFileError(UserError, ValueError):
    """A tokenizer file (DIR/tokenizer/*, a vocab.txt, a model file) that cannot be used; names the file."""


class MissingTokenizerFileError(UserError, FileNotFoundError):
    """A tokenizer file that does not exist; names the file."""


class Tokenizer(Protocol):
    """Text <-> int ids; `fit` learns from training text, `save`/`load` round-trip through a directory."""

    kind: str
    vocab_size: int

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def save(self, directory: str) -> None: ...


TOKENIZERS: Registry = Registry("tokenizer")


# ----------------------------------------------------------------------------- files and shared helpers


def _data_config(data: ml_collections.ConfigDict | None) -> ml_collections.ConfigDict:
    return default_config().data if data is None else data


def _write_file(directory: str, name: str, payload: bytes) -> None:
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name)
    with open(path + ".tmp", "wb") as f:
        f.write(payload)
    os.replace(path + ".tmp", path)  # readers never see a half-written file


def _write_spec(directory: str, spec: dict) -> None:
    """Writes tokenizer.json; call it last, after the files the spec names."""
    _write_file(directory, TOKENIZER_FILE, json.dumps(spec, ensure_ascii=False).encode("utf-8"))


def _file_error(path: str, key: str | None, problem: str, missing: bool = False) -> Exception:
    """An error naming the file and, when a config key points at it, the key."""
    if key:
        return ConfigError(f"{key}={path!r}: {problem}")
    return (MissingTokenizerFileError if missing else TokenizerFileError)(f"{path}: {problem}")


def _read_bytes(path: str, key: str | None = None) -> bytes:
    """The bytes of `path`; a missing or unreadable file is an error naming it (and `key`)."""
    if os.path.isdir(path):
        raise _file_error(path, key, "is a directory; name the file in it")
    if not os.path.isfile(path):
        raise _file_error(path, key, f"no such file (working directory {os.getcwd()})", missing=True)
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as error:
        raise _file_error(path, key, f"cannot be read ({error.strerror})") from error


def _sha256(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def _check_digest(payload: bytes, spec: dict, path: str) -> None:
    """A saved file must be the one tokenizer.json was written with."""
    if spec.get("sha256") not in (None, _sha256(payload)):
        raise TokenizerFileError(f"{path} changed since {TOKENIZER_FILE} was written (sha256 mismatch): "
                                 "the ids of this run cannot be reproduced from it")


def _checked_ids(ids: Sequence[int], vocab_size: int) -> list[int]:
    ids = [int(i) for i in ids]
    outside = sorted({i for i in ids if not 0 <= i < vocab_size})
    if outside:
        raise ValueError(f"ids {outside[:10]} are outside the tokenizer's vocabulary of {vocab_size}")
    return ids


# ----------------------------------------------------------------------------- char and byte


@TOKENIZERS.register("char")
class CharTokenizer:
    """One id per distinct character of the training text, in sorted order (the nanoGPT char recipe)."""

    kind = "char"

    def __init__(self, chars: Sequence[str]):
        self.chars = list(chars)
        self.vocab_size = len(self.chars)
        self._ids = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def fit(cls, text: str, data: ml_collections.ConfigDict | None = None) -> "CharTokenizer":
        return cls(sorted(set(text)))

    @classmethod
    def from_spec(cls, spec: dict, directory: str) -> "CharTokenizer":
        return cls(spec["chars"])

    def encode(self, text: str) -> np.ndarray:
        unknown = sorted(set(text) - self._ids.keys())
        if unknown:
            raise ConfigError(f"characters {unknown!r} are not in the char vocabulary of {self.vocab_size}, learnt "
                              "from the training text (data.tokenizer=char): use data.tokenizer=byte, or train on "
                              "text that has them")
        return np.fromiter((self._ids[c] for c in text), dtype=np.int32, count=len(text))

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def save(self, directory: str) -> None:
        _write_spec(directory, {"kind": self.kind, "chars": self.chars})


@TOKENIZERS.register("byte")
class ByteTokenizer:
    """The 256 byte values of the UTF-8 encoding; decoding replaces broken sequences."""

    kind = "byte"
    vocab_size = 256

    @classmethod
    def fit(cls, text: str, data: ml_collections.ConfigDict | None = None) -> "ByteTokenizer":
        return cls()

    @classmethod
    def from_spec(cls, spec: dict, directory: str) -> "ByteTokenizer":
        return cls()

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def save(self, directory: str) -> None:
        _write_spec(directory, {"kind": self.kind})


# ----------------------------------------------------------------------------- SentencePiece

NUM_SENTINELS = 32
# Special pieces of every trained SentencePiece model; a piece's id is its position here. The first four
# are SentencePiece's meta pieces (pad/unk/bos/eos ids); the rest are user-defined symbols for later model
# families (BERT-style mask/cls/sep, T5-style span-corruption sentinels). User-defined symbols are matched
# in the text, so a literal "<mask>" encodes as the mask id.
SPECIAL_TOKENS: dict[str, str] = {
    "pad": "<pad>",
    "unk": "<unk>",
    "bos": "<s>",
    "eos": "</s>",
    "mask": "<mask>",
    "cls": "<cls>",
    "sep": "<sep>",
    **{f"sentinel_{i}": f"<extra_id_{i}>" for i in range(NUM_SENTINELS)},
}
META_TOKENS = ("pad", "unk", "bos", "eos")
SENTENCEPIECE_MODEL_TYPES = ("unigram", "bpe")
# Training sentences are lines cut to at most this many characters (<= 4 UTF-8 bytes each), so none
# exceeds SentencePiece's max_sentence_length of 4192 bytes and gets skipped.
SENTENCE_CHARS = 1024


def _training_sentences(text: str) -> Iterator[str]:
    """The text's non-empty lines, long lines cut into pieces SentencePiece does not skip."""
    for line in text.splitlines():
        for start in range(0, len(line), SENTENCE_CHARS):
            yield line[start:start + SENTENCE_CHARS]


def _trainer_options(data: ml_collections.ConfigDict) -> dict:
    """SentencePieceTrainer options: specials from SPECIAL_TOKENS, identity normalisation and kept
    whitespace so decode(encode(text)) == text, byte fallback so no text is unknown."""
    meta = {}
    for name in META_TOKENS:
        meta[f"{name}_id"] = list(SPECIAL_TOKENS).index(name)
        meta[f"{name}_piece"] = SPECIAL_TOKENS[name]
    return dict(
        model_type=data.sentencepiece_model_type,
        vocab_size=data.tokenizer_vocab_size,
        character_coverage=1.0,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        user_defined_symbols=[piece for name, piece in SPECIAL_TOKENS.items() if name not in META_TOKENS],
        minloglevel=2,  # errors only: the INFO log is hundreds of lines
        **meta,
    )


def _training_error(error: RuntimeError, data: ml_collections.ConfigDict) -> ConfigError:
    """SentencePiece's training error rewritten to name the config key to change."""
    message, size = str(error), data.tokenizer_vocab_size
    too_high = re.search(r"Vocabulary size too high .*<= (\d+)", message)
    if too_high:
        return ConfigError(f"data.tokenizer_vocab_size={size} is too large for this text: SentencePiece can "
                           f"learn at most {too_high.group(1)} pieces from it; lower data.tokenizer_vocab_size")
    too_low = re.search(r"smaller than required_chars\. \d+ vs (\d+)", message)
    if too_low:
        return ConfigError(f"data.tokenizer_vocab_size={size} is smaller than the {too_low.group(1)} pieces "
                           "every model of this text needs (special tokens, 256 bytes, each character); "
                           "raise data.tokenizer_vocab_size")
    if "sentences_.empty()" in message:
        return ConfigError("SentencePiece has no text to train on: the data source returned no lines")
    return ConfigError(f"SentencePiece training failed (data.tokenizer_vocab_size={size}, "
                       f"data.sentencepiece_model_type={data.sentencepiece_model_type!r}): {message}")


def train_sentencepiece(text: str, data: ml_collections.ConfigDict) -> bytes:
    """A serialized SentencePiece model trained in memory on `text` with the options in `data`."""
    if data.sentencepiece_model_type not in SENTENCEPIECE_MODEL_TYPES:
        raise ConfigError(f"data.sentencepiece_model_type={data.sentencepiece_model_type!r} is not one of "
                          f"{', '.join(SENTENCEPIECE_MODEL_TYPES)}")
    if data.tokenizer_vocab_size < 1:
        raise ConfigError(f"data.tokenizer_vocab_size={data.tokenizer_vocab_size} must be >= 1")
    model = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(sentence_iterator=_training_sentences(text), model_writer=model,
                                                 **_trainer_options(data))
    except RuntimeError as error:
        raise _training_error(error, data) from error
    return model.getvalue()


def _sentencepiece_processor(model_proto: bytes, path: str,
                             key: str | None) -> sentencepiece.SentencePieceProcessor:
    try:
        processor = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
    except RuntimeError as error:
        raise _file_error(path, key, "is not a SentencePiece model (could not parse it)") from error
    if processor.get_piece_size() == 0:
        raise _file_error(path, key, "is not a SentencePiece model (it has no pieces)")
    return processor


def _special_ids(processor: sentencepiece.SentencePieceProcessor) -> dict[str, int]:
    """SPECIAL_TOKENS names -> ids, for the specials this model has (a loaded model may lack some)."""
    ids = {name: getattr(processor, f"{name}_id")() for name in META_TOKENS}
    for name, piece in SPECIAL_TOKENS.items():
        if name not in META_TOKENS and processor.piece_to_id(piece) != processor.unk_id():
            ids[name] = processor.piece_to_id(piece)
    return {name: i for name, i in ids.items() if i >= 0}


class FileBackedTokenizer:
    """A tokenizer that is the bytes of one file: `save` copies the file into DIR/tokenizer beside
    tokenizer.json (with its sha256), `from_spec` reads it back and checks it, and pickling (into Grain
    workers) sends the bytes. `path` and `key` name the file and config key in errors."""

    kind: str
    FILE: str  # the file's name in DIR/tokenizer
    SPEC_KEY: str  # the tokenizer.json entry that names the file

    def __init__(self, file_bytes: bytes, path: str, key: str | None = None):
        self.file_bytes = file_bytes

    @classmethod
    def from_file(cls, path: str, key: str | None = None):
        return cls(_read_bytes(path, key), path, key)

    @classmethod
    def from_spec(cls, spec: dict, directory: str):
        path = os.path.join(directory, spec[cls.SPEC_KEY])
        file_bytes = _read_bytes(path)
        _check_digest(file_bytes, spec, path)
        return cls(file_bytes, path)

    def __reduce__(self):
        return type(self), (self.file_bytes, f"<pickled {self.FILE}>")

    def save(self, directory: str) -> None:
        _write_file(directory, self.FILE, self.file_bytes)
        _write_spec(directory, {"kind": self.kind, self.SPEC_KEY: self.FILE, "sha256": _sha256(self.file_bytes)})


@TOKENIZERS.register("sentencepiece")
class SentencePieceTokenizer(FileBackedTokenizer):
    """A SentencePiece model (unigram or BPE), trained on the text by `fit` or loaded from
    `data.tokenizer_path`; `special_ids` maps SPECIAL_TOKENS names to the ids this model gives them."""

    kind = "sentencepiece"
    FILE, SPEC_KEY = "spm.model", "model_file"

    def __init__(self, model_proto: bytes, path: str = "<trained model>", key: str | None = None):
        super().__init__(model_proto, path, key)
        self._processor = _sentencepiece_processor(model_proto, path, key)
        self.vocab_size = self._processor.get_piece_size()
        self.special_ids = _special_ids(self._processor)

    @classmethod
    def fit(cls, text: str, data: ml_collections.ConfigDict | None = None) -> "SentencePieceTokenizer":
        """Loads data.tokenizer_path when set, else trains on `text`."""
        data = _data_config(data)
        if data.tokenizer_path:
            return cls.from_file(data.tokenizer_path, key="data.tokenizer_path")
        return cls(train_sentencepiece(text, data))

    @property
    def model_proto(self) -> bytes:
        """The serialized SentencePiece model."""
        return self.file_bytes

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._processor.encode(text), dtype=np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        return self._processor.decode(_checked_ids(ids, self.vocab_size))

    def pieces(self, ids: Sequence[int]) -> list[str]:
        """The piece of each id; "\u2581" starts a piece that begins a word (whole-word masking reads it)."""
        return [self._processor.id_to_piece(i) for i in _checked_ids(ids, self.vocab_size)]


# ----------------------------------------------------------------------------- GPT-2 byte-level BPE

# GPT-2's pre-tokenization regex as tiktoken writes it (tiktoken_ext.openai_public.r50k_pat_str): the
# original pattern with possessive quantifiers, same splits.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
GPT2_ENDOFTEXT = "<|endoftext|>"
GPT2_NUM_RANKS = 50256  # mergeable tokens; <|endoftext|> takes the next id


def load_gpt2_ranks(path: str, contents: bytes, key: str | None = None) -> dict[bytes, int]:
    """GPT-2's merge ranks from `contents`, the bytes of the tiktoken file at `path` ("base64-token rank" lines).

    Parsed as tiktoken.load.load_tiktoken_bpe does, but without its cache: that copies every local file it
    reads into $TMPDIR/data-gym-cache under the path string and, for a later file at the same path, returns
    the old copy.
    """
    ranks = {}
    for number, line in enumerate(contents.splitlines(), start=1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as error:  # also binascii.Error
            raise _file_error(path, key, f"is not a tiktoken ranks file (line {number} is not "
                                         "'base64-token rank')") from error
    if sorted(ranks.values()) != list(range(GPT2_NUM_RANKS)):
        raise _file_error(path, key, f"holds {len(ranks)} ranks, not GPT-2's {GPT2_NUM_RANKS} "
                                     f"(0..{GPT2_NUM_RANKS - 1}): point it at GPT-2's gpt2.tiktoken")
    return ranks


@TOKENIZERS.register("gpt2_bpe")
class GPT2BPETokenizer(FileBackedTokenizer):
    """GPT-2's byte-level BPE through tiktoken, from a local ranks file (no network).

    `<|endoftext|>` is id 50256 (vocab 50257); where it appears in the text it encodes as that one id, the
    document separator of GPT-2-style corpora.
    """

    kind = "gpt2_bpe"
    FILE, SPEC_KEY = "gpt2.tiktoken", "ranks_file"
    vocab_size = GPT2_NUM_RANKS + 1
    eot_id = GPT2_NUM_RANKS

    def __init__(self, ranks_file: bytes, path: str, key: str | None = None):
        super().__init__(ranks_file, path, key)
        self.special_ids = {"eos": self.eot_id}
        self._encoding = tiktoken.Encoding(
            name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=load_gpt2_ranks(path, ranks_file, key),
            special_tokens={GPT2_ENDOFTEXT: self.eot_id}, explicit_n_vocab=self.vocab_size)

    @classmethod
    def fit(cls, text: str, data: ml_collections.ConfigDict | None = None) -> "GPT2BPETokenizer":
        """Loads the ranks file at data.tokenizer_path; GPT-2's merges are not learnt from `text`."""
        path = _data_config(data).tokenizer_path
        if not path:
            raise ConfigError("data.tokenizer_path is empty: tokenizer=gpt2_bpe needs GPT-2's ranks file, e.g. "
                              "--config.data.tokenizer_path=../shared/data/gpt2.tiktoken")
        return cls.from_file(path, key="data.tokenizer_path")

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._encoding.encode(text, allowed_special="all"), dtype=np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        return self._encoding.decode(_checked_ids(ids, self.vocab_size))


# ----------------------------------------------------------------------------- BERT WordPiece

WORDPIECE_SPECIALS = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}


def read_wordpiece_vocab(vocab_bytes: bytes, path: str, key: str | None = None) -> list[str]:
    """The tokens of a BERT vocab.txt, one a line, the id being the line number (as transformers reads it)."""
    try:
        lines = io.TextIOWrapper(io.BytesIO(vocab_bytes), encoding="utf-8").readlines()
    except UnicodeDecodeError as error:
        raise _file_error(path, key, f"is not a UTF-8 vocab.txt ({error.reason} at byte {error.start})") from error
    tokens = [line.rstrip("\n") for line in lines]
    if WORDPIECE_SPECIALS["unk"] not in tokens:
        raise _file_error(path, key, f"has no {WORDPIECE_SPECIALS['unk']} line: point it at a BERT WordPiece "
                                     "vocab.txt (one token a line)")
    return tokens


def _wordpiece_backend(tokens: list[str], lowercase: bool) -> hf_tokenizers.Tokenizer:
    """BERT's tokenizer pipeline from the `tokenizers` library: BertNormalizer (lowercasing and accent
    stripping when `lowercase`), BertPreTokenizer, WordPiece, with the special tokens matched in the text."""
    vocab = {token: index for index, token in enumerate(tokens)}  # a repeated line keeps its last id
    backend = hf_tokenizers.Tokenizer(hf_tokenizers.models.WordPiece(
        vocab, unk_token=WORDPIECE_SPECIALS["unk"], max_input_chars_per_word=100))
    backend.normalizer = hf_tokenizers.normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase)
    backend.pre_tokenizer = hf_tokenizers.pre_tokenizers.BertPreTokenizer()
    backend.decoder = hf_tokenizers.decoders.WordPiece(prefix="##")
    backend.add_special_tokens([hf_tokenizers.AddedToken(token, special=True, normalized=False)
                                for token in WORDPIECE_SPECIALS.values() if token in vocab])
    return backend


@TOKENIZERS.register("wordpiece")
class WordPieceTokenizer(FileBackedTokenizer):
    """BERT's WordPiece from a vocab.txt at `data.tokenizer_path` (lowercased first when `data.lowercase`).

    `encode` gives the text's ids without [CLS]/[SEP] (tasks add them); a literal "[MASK]" etc. in the text
    encodes as that special id, as transformers' BertTokenizer does. `pieces` names each id's piece ("##"
    marks a word's continuation), which whole-word masking reads.
    """

    kind = "wordpiece"
    FILE, SPEC_KEY = "vocab.txt", "vocab_file"

    def __init__(self, vocab_bytes: bytes, path: str = "<vocab.txt>", key: str | None = None,
                 lowercase: bool = True):
        super().__init__(vocab_bytes, path, key)
        self.lowercase = bool(lowercase)
        self.tokens = read_wordpiece_vocab(vocab_bytes, path, key)
        self.vocab_size = len(self.tokens)
        self._backend = _wordpiece_backend(self.tokens, self.lowercase)
        self.special_ids = {name: self._backend.token_to_id(token) for name, token in WORDPIECE_SPECIALS.items()
                            if token in self.tokens}

    @classmethod
    def fit(cls, text: str, data: ml_collections.ConfigDict | None = None) -> "WordPieceTokenizer":
        """Loads the vocab.txt at data.tokenizer_path; BERT vocabularies are not learnt from `text`."""
        data = _data_config(data)
        if not data.tokenizer_path:
            raise ConfigError("data.tokenizer_path is empty: tokenizer=wordpiece needs a BERT vocab.txt, e.g. "
                              "the one `python -m llm_jax.convert --from=hf` imports")
        path = data.tokenizer_path
        return cls(_read_bytes(path, "data.tokenizer_path"), path, "data.tokenizer_path", data.lowercase)

    @classmethod
    def from_spec(cls, spec: dict, directory: str) -> "WordPieceTokenizer":
        path = os.path.join(directory, spec[cls.SPEC_KEY])
        vocab_bytes = _read_bytes(path)
        _check_digest(vocab_bytes, spec, path)
        return cls(vocab_bytes, path, lowercase=spec.get("lowercase", True))

    def __reduce__(self):
        return type(self), (self.file_bytes, f"<pickled {self.FILE}>", None, self.lowercase)

    def save(self, directory: str) -> None:
        _write_file(directory, self.FILE, self.file_bytes)
        _write_spec(directory, {"kind": self.kind, self.SPEC_KEY: self.FILE, "sha256": _sha256(self.file_bytes),
                                "lowercase": self.lowercase})

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._backend.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        return self._backend.decode(_checked_ids(ids, self.vocab_size), skip_special_tokens=False)

    def pieces(self, ids: Sequence[int]) -> list[str]:
        """The vocabulary entry of each id; "##" starts a piece that continues the previous word."""
        return [self.tokens[i] for i in _checked_ids(ids, self.vocab_size)]


def special_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """SPECIAL_TOKENS names -> ids that `tokenizer` has (none for char and byte tokenizers)."""
    return getattr(tokenizer, "special_ids", {})


def load_tokenizer(directory: str) -> Tokenizer:
    """Loads what `Tokenizer.save` wrote; the error names the directory when there is nothing there."""
    path = os.path.join(directory, TOKENIZER_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no tokenizer at {path}: was this work directory written by llm_jax.train?")
    spec = _read_spec(path)
    try:
        return TOKENIZERS.get(spec["kind"]).from_spec(spec, directory)
    except KeyError as error:  # an entry the kind needs is missing (an edited or truncated file)
        raise TokenizerFileError(f"{path}: no {error} entry for a {spec['kind']!r} tokenizer; the file was edited "
                                 "or damaged: restore it, or train a fresh run") from None


def _read_spec(path: str) -> dict:
    """tokenizer.json as a dict with a known "kind"; anything else is a TokenizerFileError naming the file."""
    try:
        with open(path, "rb") as f:
            spec = json.loads(f.read().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TokenizerFileError(f"{path}: not a tokenizer spec written by llm_jax ({type(error).__name__}: "
                                 f"{error}); restore it, or train a fresh run") from None
    if not isinstance(spec, dict) or spec.get("kind") not in TOKENIZERS:
        kind = spec.get("kind") if isinstance(spec, dict) else None
        raise TokenizerFileError(f"{path}: not a tokenizer spec written by llm_jax (kind {kind!r}; known: "
                                 f"{', '.join(TOKENIZERS.names())}); restore it, or train a fresh run")
    return spec
