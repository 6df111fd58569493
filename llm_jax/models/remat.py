"""Rematerialisation policies of the Transformer blocks, selected by `model.remat`.

Each policy wraps the block's module class: `none` keeps every activation for the backward pass (fastest,
most memory), the others run the block under `nn.remat` (jax.checkpoint) and keep only what the policy
saves, recomputing the rest of the block in the backward pass. The policy applies per block, in the looped
and in the scanned layout (`model.scan_layers`; there nn.remat sits inside nn.scan).
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax

from llm_jax.registry import Registry

# Tensors the block tags with jax.ad_checkpoint.checkpoint_name; `save_names` keeps exactly these.
ATTENTION_OUT, CROSS_ATTENTION_OUT, MLP_OUT = "attention_out", "cross_attention_out", "mlp_out"
SAVED_NAMES = (ATTENTION_OUT, CROSS_ATTENTION_OUT, MLP_OUT)

# (block module class, prevent_cse) -> the class to instantiate; prevent_cse is False inside nn.scan, whose
# loop already keeps XLA from merging the recomputation with the forward pass.
RematPolicy = Callable[[type[nn.Module], bool], type[nn.Module]]
REMAT_POLICIES: Registry[RematPolicy] = Registry("remat policy")


@REMAT_POLICIES.register("none")
def no_remat(block: type[nn.Module], prevent_cse: bool) -> type[nn.Module]:
    """Every activation is kept for the backward pass."""
    return block


@REMAT_POLICIES.register("full")
def full_remat(block: type[nn.Module], prevent_cse: bool) -> type[nn.Module]:
    """Only the block's inputs are kept; the whole block is recomputed in the backward pass."""
    return nn.remat(block, prevent_cse=prevent_cse, policy=jax.checkpoint_policies.nothing_saveable)


@REMAT_POLICIES.register("save_dots")
def save_dots(block: type[nn.Module], prevent_cse: bool) -> type[nn.Module]:
    """Matmul outputs without batch dimensions (the dense projections) are kept; attention scores,
    norms and activations are recomputed."""
    return nn.remat(block, prevent_cse=prevent_cse,
                    policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)


@REMAT_POLICIES.register("save_names")
def save_names(block: type[nn.Module], prevent_cse: bool) -> type[nn.Module]:
    """Only the tensors the block tags (SAVED_NAMES: attention and MLP branch outputs) are kept."""
    return nn.remat(block, prevent_cse=prevent_cse,
                    policy=jax.checkpoint_policies.save_only_these_names(*SAVED_NAMES))


def remat_block(block: type[nn.Module], policy: str, *, scanned: bool) -> type[nn.Module]:
    """`block` wrapped by the `model.remat` policy `policy`."""
    return REMAT_POLICIES.get(policy)(block, not scanned)
