"""Texts in, texts out: what `python -m llm_jax.generate` and `llm_jax.load(DIR).generate/.score` share.

Prompts are encoded without special tokens; a prompt longer than its first decoding window keeps its last
tokens (the engine's sliding window) and is reported in `notes`. Completions stop at the tokenizer's EOS
(when it has one), which is not part of the returned text.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np

from llm_jax.data.tokenizers import special_ids
from llm_jax.decoding.engine import DecodeOptions, Engine, build_engine
from llm_jax.errors import ConfigError


def engine_for(model_config: Any, tokenizer: Any) -> Engine:
    """An engine that stops at the tokenizer's EOS and pads with its pad id (0 when it has none)."""
    ids = special_ids(tokenizer)
    return build_engine(model_config, eos_id=ids.get("eos"), pad_id=ids.get("pad", 0))


def encode_prompts(tokenizer: Any, prompts: Sequence[str], where: Sequence[str] | None = None) -> list[list[int]]:
    """Token ids of each prompt; a prompt that encodes to nothing is a ConfigError naming it (or `where[i]`,
    e.g. 'prompts.jsonl:3')."""
    encoded = []
    for i, prompt in enumerate(prompts):
        ids = [int(t) for t in tokenizer.encode(prompt)]
        if not ids:
            name = where[i] if where else f"prompt {i} ({prompt!r})"
            raise ConfigError(f"{name} encodes to no tokens: give text the tokenizer can encode")
        encoded.append(ids)
    return encoded


def truncation_notes(engine: Engine, prompts_ids: Sequence[Sequence[int]], options: DecodeOptions) -> list[str]:
    """One line per prompt that the first decoding window cuts to its last tokens."""
    keep, _ = engine.window(options.max_new_tokens, max(len(p) for p in prompts_ids), beam=options.beam_size > 1)
    return [f"prompt {i} has {len(p)} tokens: truncated to its last {keep} (model.max_len={engine.max_len}, "
            f"max_new_tokens={options.max_new_tokens})" for i, p in enumerate(prompts_ids) if len(p) > keep]


def decode_completion(tokenizer: Any, engine: Engine, tokens: Sequence[int]) -> str:
    """The text of new tokens without the closing EOS; ids above the tokenizer's vocabulary (T5's sentinels,
    reserved by encoder-decoder tasks, <extra_id_0> the top id) are written as <extra_id_k>."""
    tokens = list(tokens)
    if engine.eos_id is not None and tokens and tokens[-1] == engine.eos_id:
        tokens = tokens[:-1]
    pieces, run = [], []
    for token in tokens:
        if token < tokenizer.vocab_size:
            run.append(token)
            continue
        pieces += [tokenizer.decode(run)] if run else []
        pieces.append(f"<extra_id_{engine.vocab_size - 1 - token}>")
        run = []
    return "".join(pieces + ([tokenizer.decode(run)] if run else []))


def generate_texts(engine: Engine, params: Any, tokenizer: Any, prompts_ids: Sequence[Sequence[int]],
                   options: DecodeOptions) -> list[str]:
    """The completion (without the prompt) of each encoded prompt."""
    new_tokens = engine.generate(params, prompts_ids, options)
    return [decode_completion(tokenizer, engine, tokens) for tokens in new_tokens]


def score_texts(engine: Engine, params: Any, tokenizer: Any, prompts: Sequence[str],
                continuations: Sequence[str]) -> list[np.ndarray]:
    """Per-token log-likelihoods of each continuation after its prompt (each encoded on its own)."""
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations: give one each")
    prompt_ids = encode_prompts(tokenizer, prompts)
    continuation_ids = encode_prompts(tokenizer, continuations, [f"continuation {i} ({c!r})"
                                                                 for i, c in enumerate(continuations)])
    return engine.score(params, prompt_ids, continuation_ids)


def read_prompts_file(path: str) -> tuple[list[str], list[str]]:
    """(prompts, 'path:line' of each) from a .txt file (one prompt per line) or a JSONL file (a JSON string
    or {"prompt": ...} per line); blank lines are skipped, a bad line is a ConfigError naming path:line."""
    try:
        with open(path, encoding="utf-8") as file:
            lines = file.read().split("\n")
    except OSError as error:
        raise ConfigError(f"--prompts_file={path}: cannot read it ({error.strerror})") from None
    prompts, where = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        prompt = line if path.endswith(".txt") else _json_prompt(line, f"{path}:{number}")
        prompts.append(prompt)
        where.append(f"{path}:{number}")
    if not prompts:
        raise ConfigError(f"--prompts_file={path} holds no prompts: give one prompt per line")
    return prompts, where


def _json_prompt(line: str, where: str) -> str:
    hint = 'each line must be a JSON string or an object {"prompt": "..."} (plain text lines: use a .txt file)'
    try:
        value = json.loads(line)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{where}: not JSON ({error.msg}); {hint}") from None
    if isinstance(value, dict):
        value = value.get("prompt")
    if not isinstance(value, str):
        raise ConfigError(f"{where}: no prompt string; {hint}")
    return value
