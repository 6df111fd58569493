"""The two parameter layouts of a block stack (`model.scan_layers`) and the converters between them.

Looped: one subtree per block, `block_0 .. block_{L-1}`, each holding the Block's parameters. Scanned: one
subtree `blocks` with the same paths, every array stacked on a new leading axis of length L (logical axis
`layers`), as nn.scan over one Block creates it. The converters work at any depth of a nested dict (an
encoder-decoder's `encoder/` and `decoder/` stacks convert alike), on numpy or jax arrays, and on any tree
that mirrors the parameters (Adam moments).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

SCANNED = "blocks"
LOOPED_PATTERN = re.compile(r"block_(\d+)")
RESUME_KEY = "model.scan_layers"


def looped_name(layer: int) -> str:
    return f"block_{layer}"


def looped_indices(tree: Mapping[str, Any]) -> list[int]:
    """The layer numbers of the `block_{i}` entries directly in `tree`, sorted."""
    return sorted(int(match.group(1)) for match in map(LOOPED_PATTERN.fullmatch, tree) if match)


def is_scanned(tree: Mapping[str, Any]) -> bool:
    """Whether `tree` holds a scanned stack (a `blocks` entry) at any depth."""
    return SCANNED in tree or any(isinstance(value, Mapping) and is_scanned(value) for value in tree.values())


def _stack(leaves: list[Any]) -> Any:
    if all(isinstance(leaf, np.ndarray) for leaf in leaves):
        return np.stack(leaves)
    return jnp.stack(leaves)


def _map_layers(trees: list[Any], combine) -> Any:
    """`combine` over the matching leaves of same-structured nested dicts."""
    if isinstance(trees[0], Mapping):
        keys = set(trees[0])
        for tree in trees[1:]:
            if not isinstance(tree, Mapping) or set(tree) != keys:
                raise ValueError("the blocks have different parameter trees; only identical blocks stack "
                                 f"(keys {sorted(keys)} vs {sorted(tree) if isinstance(tree, Mapping) else tree!r})")
        return {key: _map_layers([tree[key] for tree in trees], combine) for key in trees[0]}
    return combine(trees)


def to_scanned(tree: Mapping[str, Any]) -> dict[str, Any]:
    """`tree` with every `block_0 .. block_{L-1}` group (at any depth) stacked into one `blocks` subtree."""
    indices = looped_indices(tree)
    if indices and indices != list(range(len(indices))):
        raise ValueError(f"the blocks are numbered {indices}; a stack needs block_0 .. block_{len(indices) - 1}")
    if indices and SCANNED in tree:
        raise ValueError(f"the tree holds both {SCANNED!r} and block_{{i}} entries; it is neither layout")
    out = {key: (to_scanned(value) if isinstance(value, Mapping) else value)
           for key, value in tree.items() if not LOOPED_PATTERN.fullmatch(key)}
    if indices:
        out[SCANNED] = _map_layers([to_scanned(tree[looped_name(i)]) for i in indices], _stack)
    return out


def _num_stacked(stacked: Mapping[str, Any]) -> int:
    lengths = {int(np.shape(leaf)[0]) for leaf in jax.tree.leaves(stacked)}
    if len(lengths) != 1:
        raise ValueError(f"the {SCANNED!r} arrays have leading axes of different lengths {sorted(lengths)}")
    return lengths.pop()


def to_looped(tree: Mapping[str, Any]) -> dict[str, Any]:
    """`tree` with every `blocks` subtree (at any depth) split into `block_0 .. block_{L-1}` along axis 0."""
    out = {key: (to_looped(value) if isinstance(value, Mapping) else value)
           for key, value in tree.items() if key != SCANNED}
    if SCANNED in tree:
        if looped_indices(tree):
            raise ValueError(f"the tree holds both {SCANNED!r} and block_{{i}} entries; it is neither layout")
        stacked = to_looped(tree[SCANNED])
        for index in range(_num_stacked(stacked)):
            out[looped_name(index)] = jax.tree.map(lambda leaf, i=index: leaf[i], stacked)
    return out


def to_layout(tree: Mapping[str, Any], scan_layers: bool) -> dict[str, Any]:
    """`tree` in the layout `model.scan_layers` asks for, whichever layout it is in (converting is idempotent)."""
    return to_scanned(tree) if scan_layers else to_looped(tree)


def check_layout_unchanged(changes: Mapping[str, Any], workdir: str) -> None:
    """A resume may not switch `model.scan_layers`: the checkpoint's parameter and optimizer-state trees have
    the other layout. Raised even with --allow_config_change, before anything is built."""
    from llm_jax.errors import ConfigError

    if RESUME_KEY in changes:
        before, now = changes[RESUME_KEY]
        raise ConfigError(f"{workdir} holds a run trained with {RESUME_KEY}={before}; this start asks for "
                          f"{RESUME_KEY}={now}, which stores the parameters and optimizer state in the other layout "
                          f"and cannot resume the checkpoint. Resume with {RESUME_KEY}={before}, or start a new "
                          f"--workdir with --config.train.init_from={workdir} (the weights convert; the optimizer "
                          "state starts afresh)")
