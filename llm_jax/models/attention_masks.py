"""Self-attention masks of decoder-only models, selected by `model.attention_mask`.

`causal` (GPT): a token reads the tokens at or before it. `prefix_lm` (T5's and UniLM's prefix LM): the tokens of
a row's prefix (`prefix_BT`, 1 on them, e.g. an SFT pair's prompt) read every prefix token of their own segment,
bidirectionally; the other tokens read causally, which includes the whole prefix before them. Segments still
separate packed sequences. Encoders stay bidirectional and encoder-decoder decoders causal: other families take
only `causal` (checked when the model config is built, `check_attention_mask`).
"""

from __future__ import annotations

import dataclasses

import jax

from llm_jax.errors import ConfigError
from llm_jax.models.model_config import ModelConfig
from llm_jax.registry import Registry


@dataclasses.dataclass(frozen=True)
class AttentionMask:
    """One mask: whether the model reads a prefix input (`prefix_BT`), and the families it applies to
    (None = every family)."""

    uses_prefix: bool
    families: tuple[str, ...] | None = None


ATTENTION_MASKS: Registry[AttentionMask] = Registry("attention mask")
ATTENTION_MASKS.add("causal", AttentionMask(uses_prefix=False))
ATTENTION_MASKS.add("prefix_lm", AttentionMask(uses_prefix=True, families=("decoder",)))


def uses_prefix(cfg: ModelConfig) -> bool:
    """Whether `cfg`'s self-attention reads a prefix (callers pass prefix_BT only then: causal programs stay
    unchanged)."""
    return ATTENTION_MASKS.get(cfg.attention_mask).uses_prefix


def check_attention_mask(cfg: ModelConfig) -> None:
    """ConfigError naming model.attention_mask when `cfg.family` cannot take the chosen mask."""
    families = ATTENTION_MASKS.get(cfg.attention_mask).families
    if families is not None and cfg.family not in families:
        raise ConfigError(f"model.attention_mask={cfg.attention_mask!r} applies to model.family in {list(families)}, "
                          f"not {cfg.family!r} (encoders are bidirectional, encoder-decoder decoders causal): set "
                          "model.attention_mask=causal")


def prefix_visible(q_prefix_BT: jax.Array, k_prefix_BS: jax.Array, causal_BTS: jax.Array) -> jax.Array:
    """[B, T, S] True where query t may read key s under the prefix LM: causally, or both in the prefix."""
    both_BTS = q_prefix_BT.astype(bool)[:, :, None] & k_prefix_BS.astype(bool)[:, None, :]
    return causal_BTS | both_BTS
