"""A sequence-labelling corpus derived from plain text: punctuation restoration.

Each word of a text gets the punctuation mark that follows it (O when none) and the marks are removed, so
a model must put commas and sentence ends back from the words alone, a standard labelling task (e.g. for
speech transcripts). Derived from any tokenized text file (WikiText-2's tokens are space-separated), written
as CoNLL columns (word, tag) and read by the `conll` source.
"""

from __future__ import annotations

import hashlib
import os
from typing import Iterator

PUNCTUATION_LABELS = ("O", "COMMA", "PERIOD", "QUESTION")
_MARKS = {",": "COMMA", ";": "COMMA", ":": "COMMA", ".": "PERIOD", "!": "PERIOD", "?": "QUESTION"}
_SKIPPED = {"@-@", "@,@", "@.@", '"', "(", ")", "'", "--", "-"}


def labelled_words(line: str) -> list[tuple[str, str]]:
    """(word, tag) pairs of one line: a mark labels the word before it; other punctuation is dropped."""
    pairs: list[tuple[str, str]] = []
    for token in line.split():
        if token in _MARKS:
            if pairs:
                pairs[-1] = (pairs[-1][0], _MARKS[token])
        elif token not in _SKIPPED and any(character.isalnum() for character in token):
            pairs.append((token, "O"))
    return pairs


def conll_sentences(text: str, words_per_example: int) -> Iterator[list[tuple[str, str]]]:
    """Examples of about `words_per_example` words, cut after a sentence end where possible, per paragraph."""
    for line in text.splitlines():
        if line.strip().startswith("="):  # WikiText section headings
            continue
        pairs = labelled_words(line)
        start = 0
        while start < len(pairs):
            stop = min(start + words_per_example, len(pairs))
            ends = [i + 1 for i in range(start, stop) if pairs[i][1] in ("PERIOD", "QUESTION")]
            if stop < len(pairs) and ends:
                stop = ends[-1]
            yield pairs[start:stop]
            start = stop


def read_utf8_text(path: str) -> str:
    """The UTF-8 text of `path`; invalid UTF-8 is a ValueError naming the file, line and byte offset."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ValueError(f"{path}:{line}: invalid UTF-8 at byte offset {error.start} ({error.reason})") from None


def derive_conll(source_path: str, directory: str, words_per_example: int = 48) -> str:
    """Writes the CoNLL file of `source_path` into `directory` once (named by a hash of the text and the
    settings) and returns its path."""
    text = read_utf8_text(source_path)
    digest = hashlib.sha256(f"{words_per_example}\n{text}".encode("utf-8")).hexdigest()[:16]
    stem = os.path.splitext(os.path.basename(source_path))[0]
    path = os.path.join(directory, f"{stem}-{digest}.conll")
    if not os.path.exists(path):
        os.makedirs(directory, exist_ok=True)
        lines = []
        for example in conll_sentences(text, words_per_example):
            lines += [f"{word}\t{tag}\n" for word, tag in example] + ["\n"]
        if not lines:
            raise ValueError(f"{source_path}: no words to label (the text is empty, or only headings and punctuation)")
        with open(f"{path}.{os.getpid()}.tmp", "w", encoding="utf-8") as f:
            f.writelines(lines)
        os.replace(f"{path}.{os.getpid()}.tmp", path)
    return path
