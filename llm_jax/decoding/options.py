"""How to decode: the options of the decoding engine (llm_jax.decoding.engine) and of the reference sampler
without a cache (llm_jax.decoding.sampling), checked before anything loads or compiles."""

from __future__ import annotations

import dataclasses
import math

from llm_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """How to decode; `check` names the CLI flag of a value that cannot decode."""

    max_new_tokens: int = 200
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    beam_size: int = 1  # 1 = greedy/sampling
    length_penalty: float = 0.0  # GNMT alpha of beam search
    seed: int = 0

    def check(self) -> "DecodeOptions":
        problems = [(self.max_new_tokens >= 1, f"--max_new_tokens={self.max_new_tokens}: generate at least 1 token"),
                    (math.isfinite(self.temperature) and self.temperature >= 0,
                     f"--temperature={self.temperature}: give a temperature >= 0 (0 = greedy)"),
                    (self.top_k >= 0, f"--top_k={self.top_k}: give k >= 0 (0 = every token)"),
                    (0 < self.top_p <= 1, f"--top_p={self.top_p}: give a probability mass in (0, 1] (1 = off)"),
                    (self.beam_size >= 1, f"--beam_size={self.beam_size}: give a beam size >= 1 (1 = no beam search)"),
                    (math.isfinite(self.length_penalty) and self.length_penalty >= 0,
                     f"--length_penalty={self.length_penalty}: give alpha >= 0 (0 = none)")]
        for ok, message in problems:
            if not ok:
                raise ConfigError(message)
        return self

    @property
    def strategy(self) -> str:
        if self.beam_size > 1:
            return "beam"
        return "greedy" if self.temperature == 0 else "sample"
