"""Model FLOPs of one training row, per family, and the train/mfu scale built from them.

    train/mfu = train/tokens_per_second * model FLOPs per token / (peak FLOP/s per device * devices)

What is counted (forward multiply-accumulates, MACs, of one row of `seq_len` positions):
  * every matmul with a weight, once per position it is applied to: the q, k, v and output projections of
    attention (grouped-query k/v with num_kv_heads), the MLP (2 matrices, 3 when gated), BERT's pooler and
    MLM transform, and the output head: a matmul of d_model x vocab_size (the tokenizer's vocabulary; the rows
    padded for sharding are an implementation cost, like recomputation, not model FLOPs);
  * attention's two matmuls, scores Q K^T and values P V: 2 * num_heads * head_dim MACs per (query, key)
    pair. The encoder attends bidirectionally, T^2 pairs. The decoder is causal: only the lower triangle,
    T (T + 1) / 2 pairs (the full T^2 minus the upper triangle T (T - 1) / 2, about half), whatever the
    attention kernel computes (a dense masked kernel computes all T^2; MFU counts the useful half, as PaLM,
    FlashAttention and MaxText do). Segment masks of packed documents are not subtracted;
  * embeddings and position tables: lookups, 0. Norms, activations, softmax, biases, residual adds and
    dropout are elementwise, O(d_model) per position, and not counted.
Training multiplier: forward 2 FLOPs per MAC, backward 4 (gradients of the inputs and of the weights), so a
trained row costs 6 x its forward MACs. Recomputation (remat) is not counted: that would be hardware FLOPs.
The FLOPs per token spread a row over its seq_len positions; train/tokens_per_second counts the positions
that carry a loss (padding excluded), so padded rows count only their real tokens.

Families register their formula in FAMILY_FLOPS under their `llm_jax.models.families` name (decoder,
encoder, encoder_decoder). An encoder-decoder row has seq_len encoder positions and `head_positions` decoder
positions; its loss-bearing tokens are decoder positions, so its FLOPs per token spread the row over those.
"""

from __future__ import annotations

import math
from typing import Callable

from llm_jax.models.mlp import gated_mlp
from llm_jax.models.model_config import ModelConfig
from llm_jax.registry import Registry

FORWARD_FLOPS_PER_MAC = 2
BACKWARD_FLOPS_PER_MAC = 4
TRAIN_FLOPS_PER_MAC = FORWARD_FLOPS_PER_MAC + BACKWARD_FLOPS_PER_MAC

Breakdown = dict[str, float]  # forward MACs of one row by part: projections, mlp, attention, head, ...


def causal_pairs(seq_len: int) -> int:
    """(query, key) pairs a causal layer attends: the lower triangle with its diagonal, T (T + 1) / 2."""
    return seq_len * (seq_len + 1) // 2


def bidirectional_pairs(seq_len: int) -> int:
    """(query, key) pairs a bidirectional layer attends: all T^2."""
    return seq_len * seq_len


def projection_macs(cfg: ModelConfig) -> int:
    """Attention's weight matmuls per position: q and output (num_heads), k and v (num_kv_heads)."""
    return cfg.d_model * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)


def mlp_macs(cfg: ModelConfig) -> int:
    """The MLP's weight matmuls per position: up and down, plus the gate of a gated MLP."""
    return cfg.d_model * cfg.d_ff * (3 if gated_mlp(cfg.mlp) else 2)


def attention_macs(cfg: ModelConfig, pairs: int) -> int:
    """Scores and values of one layer over `pairs` (query, key) pairs."""
    return 2 * cfg.num_heads * cfg.head_dim * pairs


# Output heads by name (llm_jax.models.heads.HEADS): forward MACs per row, given the row length and the
# positions the vocabulary heads read (all of them, or BERT's masked-LM prediction slots).
HeadMacs = Callable[[ModelConfig, int, int], float]
HEAD_MACS: Registry[HeadMacs] = Registry("head FLOP formula")
HEAD_MACS.add("lm", lambda cfg, seq_len, positions: positions * cfg.d_model * cfg.vocab_size)
HEAD_MACS.add("mlm", lambda cfg, seq_len, positions: positions * (cfg.d_model * cfg.d_model
                                                                  + cfg.d_model * cfg.vocab_size))
HEAD_MACS.add("nsp", lambda cfg, seq_len, positions: 2 * cfg.d_model)
HEAD_MACS.add("classifier", lambda cfg, seq_len, positions: (cfg.num_labels or 0) * cfg.d_model)
HEAD_MACS.add("token_classifier", lambda cfg, seq_len, positions: seq_len * (cfg.num_labels or 0) * cfg.d_model)


def head_macs(cfg: ModelConfig, seq_len: int, head_positions: int | None) -> float:
    """All of the config's heads on one row; `head_positions` None = every position."""
    positions = seq_len if head_positions is None else head_positions
    return float(sum(HEAD_MACS.get(name)(cfg, seq_len, positions) for name in cfg.heads))


def _stack_macs(cfg: ModelConfig, layers: int, seq_len: int, pairs: int) -> Breakdown:
    return {"projections": float(layers * seq_len * projection_macs(cfg)),
            "mlp": float(layers * seq_len * mlp_macs(cfg)),
            "attention": float(layers * attention_macs(cfg, pairs))}


FamilyMacs = Callable[[ModelConfig, int, int | None], Breakdown]
FAMILY_FLOPS: Registry[FamilyMacs] = Registry("family FLOP formula")


@FAMILY_FLOPS.register("decoder")
def decoder_forward_macs(cfg: ModelConfig, seq_len: int, head_positions: int | None = None) -> Breakdown:
    """A causal decoder row: the blocks over T positions with causal attention, then the heads."""
    return {**_stack_macs(cfg, cfg.num_layers, seq_len, causal_pairs(seq_len)),
            "head": head_macs(cfg, seq_len, head_positions)}


@FAMILY_FLOPS.register("encoder")
def encoder_forward_macs(cfg: ModelConfig, seq_len: int, head_positions: int | None = None) -> Breakdown:
    """A bidirectional encoder row: the blocks with full attention, BERT's pooler (one position) if the
    config has it, then the heads (masked LM at `head_positions` of the row when the task predicts a few)."""
    macs = _stack_macs(cfg, cfg.num_layers, seq_len, bidirectional_pairs(seq_len))
    macs["pooler"] = float(cfg.d_model * cfg.d_model if cfg.pooler else 0)
    macs["head"] = head_macs(cfg, seq_len, head_positions)
    return macs


def encoder_decoder_forward_macs(cfg: ModelConfig, *, encoder_layers: int, decoder_layers: int, source_len: int,
                                 target_len: int) -> Breakdown:
    """A T5-style row: a bidirectional encoder over the source, a causal decoder over the target whose every
    layer also cross-attends to the encoder output, and the LM head on every target position.

    Cross-attention per decoder layer: q and output projections over the target, k and v over the source
    (num_kv_heads), and target_len x source_len (query, key) pairs, all of them (no causal mask).
    """
    encoder = _stack_macs(cfg, encoder_layers, source_len, bidirectional_pairs(source_len))
    decoder = _stack_macs(cfg, decoder_layers, target_len, causal_pairs(target_len))
    cross_projections = (target_len * 2 * cfg.d_model * cfg.head_dim * cfg.num_heads
                         + source_len * 2 * cfg.d_model * cfg.head_dim * cfg.num_kv_heads)
    return {**{f"encoder_{part}": value for part, value in encoder.items()},
            **{f"decoder_{part}": value for part, value in decoder.items()},
            "cross_projections": float(decoder_layers * cross_projections),
            "cross_attention": float(decoder_layers * attention_macs(cfg, target_len * source_len)),
            "head": float(target_len * cfg.d_model * cfg.vocab_size)}


@FAMILY_FLOPS.register("encoder_decoder")
def encoder_decoder_row_macs(cfg: ModelConfig, seq_len: int, head_positions: int | None = None) -> Breakdown:
    """encoder_decoder_forward_macs of a row of seq_len encoder and head_positions (default seq_len) decoder
    positions."""
    return encoder_decoder_forward_macs(cfg, encoder_layers=cfg.num_layers, decoder_layers=cfg.num_decoder_layers,
                                        source_len=seq_len, target_len=head_positions or seq_len)


def forward_macs(cfg: ModelConfig, seq_len: int, head_positions: int | None = None) -> Breakdown:
    """The family's formula for one row (FAMILY_FLOPS[cfg.family])."""
    return FAMILY_FLOPS.get(cfg.family)(cfg, seq_len, head_positions)


def train_flops_per_row(cfg: ModelConfig, seq_len: int, head_positions: int | None = None) -> float:
    """Forward + backward FLOPs of one training row: 6 x its forward MACs."""
    return TRAIN_FLOPS_PER_MAC * math.fsum(forward_macs(cfg, seq_len, head_positions).values())


def train_flops_per_token(cfg: ModelConfig, seq_len: int, head_positions: int | None = None) -> float:
    """Training FLOPs of one row spread over its seq_len positions (an encoder-decoder's: its decoder positions)."""
    positions = (head_positions or seq_len) if cfg.family == "encoder_decoder" else seq_len
    return train_flops_per_row(cfg, seq_len, head_positions) / positions


def mfu_scale(flops_per_token: float, peak_flops_per_device: float | None, num_devices: int) -> float | None:
    """train/mfu per train token per second: FLOPs per token over the peak of all devices; None without a peak."""
    if not peak_flops_per_device:
        return None
    return flops_per_token / (peak_flops_per_device * num_devices)
