"""Tokenizers behind one interface, selected by `data.tokenizer` and saved under DIR/tokenizer/."""

from __future__ import annotations

import json
import os
from typing import Protocol, Sequence

import numpy as np

from llm_jax.registry import Registry

TOKENIZER_FILE = "tokenizer.json"


class Tokenizer(Protocol):
    """Text <-> int ids; `fit` learns from training text, `save`/`load` round-trip through a directory."""

    kind: str
    vocab_size: int

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def save(self, directory: str) -> None: ...


TOKENIZERS: Registry = Registry("tokenizer")


def _write_spec(directory: str, spec: dict) -> None:
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, TOKENIZER_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(spec, f, ensure_ascii=False)
    os.replace(path + ".tmp", path)  # readers never see a half-written file


@TOKENIZERS.register("char")
class CharTokenizer:
    """One id per distinct character of the training text, in sorted order (the nanoGPT char recipe)."""

    kind = "char"

    def __init__(self, chars: Sequence[str]):
        self.chars = list(chars)
        self.vocab_size = len(self.chars)
        self._ids = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def fit(cls, text: str) -> "CharTokenizer":
        return cls(sorted(set(text)))

    @classmethod
    def from_spec(cls, spec: dict) -> "CharTokenizer":
        return cls(spec["chars"])

    def encode(self, text: str) -> np.ndarray:
        unknown = sorted(set(text) - self._ids.keys())
        if unknown:
            raise ValueError(f"characters {unknown!r} are not in the char vocabulary of {self.vocab_size}")
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
    def fit(cls, text: str) -> "ByteTokenizer":
        return cls()

    @classmethod
    def from_spec(cls, spec: dict) -> "ByteTokenizer":
        return cls()

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def save(self, directory: str) -> None:
        _write_spec(directory, {"kind": self.kind})


def load_tokenizer(directory: str) -> Tokenizer:
    """Loads what `Tokenizer.save` wrote; the error names the directory when there is nothing there."""
    path = os.path.join(directory, TOKENIZER_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no tokenizer at {path}: was this work directory written by llm_jax.train?")
    with open(path) as f:
        spec = json.load(f)
    return TOKENIZERS.get(spec["kind"]).from_spec(spec)
