"""Raw text sources, selected by `data.source`; each returns the whole corpus as one string."""

from __future__ import annotations

import os
from typing import Callable

import ml_collections

from llm_jax.config import ConfigError
from llm_jax.registry import Registry

SOURCES: Registry[Callable[[ml_collections.ConfigDict], str]] = Registry("data source")


@SOURCES.register("text_file")
def read_text_file(data: ml_collections.ConfigDict) -> str:
    """The UTF-8 file at `data.path`."""
    path = data.path
    if not path:
        raise ConfigError("data.path is empty: set --config.data.path=FILE for data.source=text_file")
    if not os.path.isfile(path):
        raise ConfigError(f"data.path={path!r}: no such file (working directory {os.getcwd()})")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not text.strip():
        raise ConfigError(f"data.path={path!r} is empty: point data.path at a file with text in it")
    return text


@SOURCES.register("python_docs")
def read_python_docs(data: ml_collections.ConfigDict) -> str:
    """The topic pages of Python's own help system (`pydoc_data.topics`), shipped with every CPython.

    About 750 KB of English prose and code, so the default experiment runs offline with no data file.
    """
    from pydoc_data import topics

    return "\n\n".join(topics.topics[name].strip() for name in sorted(topics.topics))
