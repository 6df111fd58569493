"""Linear-chain CRF output layer for token classification (sequence labeling).

Token classification labels only the first sub-token of each word, so the labeled positions of a row are not
contiguous; `gather_labeled` moves them to a prefix so the chain runs over words, and `scatter_labeled` puts
decoded word tags back. The chain functions assume prefix masks and compute in float32.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


def gather_labeled(emissions_BTC: jax.Array, tags_BT: jax.Array,
                   mask_BT: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Moves each row's labeled positions (mask true) to a contiguous prefix, keeping their order."""
    mask_BT = mask_BT.astype(bool)
    order_BT = jnp.argsort(~mask_BT, axis=1, stable=True)
    emissions_BTC = jnp.take_along_axis(emissions_BTC, order_BT[..., None], axis=1)
    tags_BT = jnp.take_along_axis(tags_BT, order_BT, axis=1)
    return emissions_BTC, tags_BT, jnp.take_along_axis(mask_BT, order_BT, axis=1)


def scatter_labeled(tags_BT_compact: jax.Array, mask_BT: jax.Array) -> jax.Array:
    """Puts prefix-compacted word tags back at the labeled positions of `mask_BT`; other positions get 0."""
    mask_BT = mask_BT.astype(bool)
    rank_BT = jnp.maximum(jnp.cumsum(mask_BT, axis=1) - 1, 0)
    return jnp.where(mask_BT, jnp.take_along_axis(tags_BT_compact, rank_BT, axis=1), 0)


def _sequence_score(emissions_BTC: jax.Array, tags_BT: jax.Array, mask_BT: jax.Array, transitions_CC: jax.Array,
                    start_C: jax.Array, end_C: jax.Array) -> jax.Array:
    """Unnormalised score of the tag path `tags_BT` over the masked prefix of each row."""
    maskf_BT = mask_BT.astype(jnp.float32)
    emitted_BT = jnp.take_along_axis(emissions_BTC, tags_BT[..., None], axis=-1)[..., 0]
    pair_BT = mask_BT[:, 1:] & mask_BT[:, :-1]
    moved_BT = transitions_CC[tags_BT[:, :-1], tags_BT[:, 1:]] * pair_BT
    last_B = jnp.maximum(mask_BT.sum(1) - 1, 0)
    last_tag_B = jnp.take_along_axis(tags_BT, last_B[:, None], axis=1)[:, 0]
    return (start_C[tags_BT[:, 0]] + (emitted_BT * maskf_BT).sum(1) + moved_BT.sum(1) + end_C[last_tag_B])


def _log_partition(emissions_BTC: jax.Array, mask_BT: jax.Array, transitions_CC: jax.Array, start_C: jax.Array,
                   end_C: jax.Array) -> jax.Array:
    """log Z by the forward algorithm; masked steps carry alpha unchanged."""

    def step(alpha_BC, inputs):
        emissions_BC, mask_B = inputs
        next_BC = jax.nn.logsumexp(alpha_BC[:, :, None] + transitions_CC[None], axis=1) + emissions_BC
        return jnp.where(mask_B[:, None], next_BC, alpha_BC), None

    alpha_BC = start_C[None] + emissions_BTC[:, 0]
    alpha_BC, _ = lax.scan(step, alpha_BC, (jnp.swapaxes(emissions_BTC[:, 1:], 0, 1), mask_BT[:, 1:].T))
    return jax.nn.logsumexp(alpha_BC + end_C[None], axis=-1)


def crf_log_likelihood(emissions_BTC: jax.Array, tags_BT: jax.Array, mask_BT: jax.Array, transitions_CC: jax.Array,
                       start_C: jax.Array, end_C: jax.Array) -> jax.Array:
    """log p(tags | emissions) per row [B] for prefix masks; rows with no labeled position give 0.

    transitions_CC[i, j] scores moving from label i to label j.
    """
    mask_BT = mask_BT.astype(bool)
    emissions_BTC = emissions_BTC.astype(jnp.float32)
    transitions_CC, start_C, end_C = (x.astype(jnp.float32) for x in (transitions_CC, start_C, end_C))
    tags_BT = jnp.where(mask_BT, tags_BT, 0).astype(jnp.int32)
    score_B = _sequence_score(emissions_BTC, tags_BT, mask_BT, transitions_CC, start_C, end_C)
    log_z_B = _log_partition(emissions_BTC, mask_BT, transitions_CC, start_C, end_C)
    return jnp.where(mask_BT.any(1), score_B - log_z_B, 0.0)


def viterbi_decode(emissions_BTC: jax.Array, mask_BT: jax.Array, transitions_CC: jax.Array, start_C: jax.Array,
                   end_C: jax.Array) -> jax.Array:
    """Most likely tag path [B, T] (int32) for prefix masks; positions outside the mask are 0."""
    mask_BT = mask_BT.astype(bool)
    emissions_BTC = emissions_BTC.astype(jnp.float32)
    transitions_CC, start_C, end_C = (x.astype(jnp.float32) for x in (transitions_CC, start_C, end_C))
    num_labels = emissions_BTC.shape[-1]
    identity_C = jnp.arange(num_labels, dtype=jnp.int32)

    def forward(score_BC, inputs):
        emissions_BC, mask_B = inputs
        candidates_BCC = score_BC[:, :, None] + transitions_CC[None]
        best_prev_BC = jnp.argmax(candidates_BCC, axis=1).astype(jnp.int32)
        next_BC = jnp.max(candidates_BCC, axis=1) + emissions_BC
        score_BC = jnp.where(mask_B[:, None], next_BC, score_BC)
        return score_BC, jnp.where(mask_B[:, None], best_prev_BC, identity_C[None])

    score_BC = start_C[None] + emissions_BTC[:, 0]
    score_BC, backpointers_TBC = lax.scan(
        forward, score_BC, (jnp.swapaxes(emissions_BTC[:, 1:], 0, 1), mask_BT[:, 1:].T))
    last_tag_B = jnp.argmax(score_BC + end_C[None], axis=-1).astype(jnp.int32)

    def backward(tag_B, backpointers_BC):
        prev_B = jnp.take_along_axis(backpointers_BC, tag_B[:, None], axis=1)[:, 0]
        return prev_B, prev_B

    _, earlier_TB = lax.scan(backward, last_tag_B, backpointers_TBC, reverse=True)
    tags_BT = jnp.concatenate([earlier_TB.T, last_tag_B[:, None]], axis=1)
    return jnp.where(mask_BT, tags_BT, 0).astype(jnp.int32)


class CRF(nn.Module):
    """Linear-chain CRF over the labeled (mask true) positions of each row, which need not be contiguous."""

    num_labels: int
    param_dtype: jnp.dtype = jnp.float32

    def setup(self) -> None:
        zeros = nn.initializers.zeros
        self.transitions = self.param("transitions", nn.with_logical_partitioning(zeros, (None, None)),
                                      (self.num_labels, self.num_labels), self.param_dtype)
        self.start = self.param("start", nn.with_logical_partitioning(zeros, (None,)), (self.num_labels,),
                                self.param_dtype)
        self.end = self.param("end", nn.with_logical_partitioning(zeros, (None,)), (self.num_labels,),
                              self.param_dtype)

    def log_likelihood(self, emissions_BTC: jax.Array, tags_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
        """log p(tags | emissions) per row [B] over the labeled positions."""
        emissions_BTC, tags_BT, mask_BT = gather_labeled(emissions_BTC, tags_BT, mask_BT)
        return crf_log_likelihood(emissions_BTC, tags_BT, mask_BT, self.transitions, self.start, self.end)

    def decode(self, emissions_BTC: jax.Array, mask_BT: jax.Array) -> jax.Array:
        """Viterbi tags [B, T] at the labeled positions (0 elsewhere)."""
        dummy_tags_BT = jnp.zeros(mask_BT.shape, jnp.int32)
        emissions_BTC, _, compact_mask_BT = gather_labeled(emissions_BTC, dummy_tags_BT, mask_BT)
        tags_BT = viterbi_decode(emissions_BTC, compact_mask_BT, self.transitions, self.start, self.end)
        return scatter_labeled(tags_BT, mask_BT)
