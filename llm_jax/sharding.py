"""The device mesh from `config.mesh`, logical-axis rules, and placement of host batches on the mesh."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llm_jax.config import MESH_AXES
from llm_jax.errors import ConfigError

Rules = tuple[tuple[str, Any], ...]

# Logical names of the vocabulary dimensions in llm_jax.models: embedding/output parameters, and the logits.
VOCAB_LOGICAL_AXES = ("vocab", "act_vocab")


def build_mesh(mesh_sizes: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes (data, fsdp, tensor) and Auto axis types, as linen's logical constraints need."""
    shape = tuple(mesh_sizes[axis] for axis in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def logical_rules(mesh_config: ml_collections.ConfigDict) -> Rules:
    """The rule table as hashable tuples (ConfigDict may hand back lists)."""
    return tuple((name, tuple(axes) if isinstance(axes, list) else axes)
                 for name, axes in mesh_config.logical_axis_rules)


def mesh_axes_of(rules: Rules, logical_names: Sequence[str]) -> tuple[str, ...]:
    """The mesh axes that any rule for one of `logical_names` maps to, each once, in rule order.

    Every rule for a name counts, fallbacks too: flax takes a later rule for a name when an earlier rule's mesh
    axis is already used by another dimension of the array, so any of them may end up sharding it.
    """
    axes: list[str] = []
    for name, mesh_axes in rules:
        if name in logical_names:
            for axis in (mesh_axes,) if mesh_axes is None or isinstance(mesh_axes, str) else mesh_axes:
                if axis is not None and axis not in axes:
                    axes.append(axis)
    return tuple(axes)


def vocab_shard_sizes(mesh_sizes: dict[str, int], rules: Rules) -> dict[str, int]:
    """{mesh axis: size} of the axes the vocabulary dimensions are split over under `rules`; the padded
    vocabulary must be a multiple of their product (llm_jax.models.model_config.padded_vocab)."""
    axes = mesh_axes_of(rules, VOCAB_LOGICAL_AXES)
    unknown = [axis for axis in axes if axis not in mesh_sizes]
    if unknown:
        raise ConfigError(f"mesh.logical_axis_rules maps {'/'.join(VOCAB_LOGICAL_AXES)} to unknown mesh axes "
                          f"{unknown}; use axes of {MESH_AXES}")
    return {axis: mesh_sizes[axis] for axis in axes}


def logical_sharding(mesh: Mesh, rules: Rules, logical_axes: Sequence[str | None]) -> NamedSharding:
    return NamedSharding(mesh, nn.logical_to_mesh_axes(tuple(logical_axes), rules))


def batch_sharding(mesh: Mesh, rules: Rules, *, stacked: bool, axes: Sequence[str | None] = (None,)) -> NamedSharding:
    """Sharding of a [batch, *rest] array whose other dimensions have the logical `axes`, or of a
    [steps, batch, *rest] stack of them."""
    logical = ("batch", *axes)
    return logical_sharding(mesh, rules, (None, *logical) if stacked else logical)


def batch_shardings(mesh: Mesh, rules: Rules, spec: dict[str, Any], *, stacked: bool) -> dict[str, NamedSharding]:
    """One sharding per key of a task's batch spec (`llm_jax.tasks.base.Field`): a [batch] label array and a
    [batch, seq] token array are split along the batch the same way."""
    return {key: batch_sharding(mesh, rules, stacked=stacked, axes=field.axes) for key, field in spec.items()}


def process_batch_rows(mesh: Mesh, rules: Rules, global_batch_size: int) -> tuple[int, int]:
    """The rows [start, stop) of a global batch that this process's devices hold.

    With the batch split over data/fsdp, each process holds a contiguous block; where the batch is
    replicated (e.g. a pure tensor-parallel mesh) every process holds all rows.
    """
    sharding = batch_sharding(mesh, rules, stacked=False, axes=())
    index_map = sharding.addressable_devices_indices_map((global_batch_size,))
    blocks = sorted({(rows.start or 0, global_batch_size if rows.stop is None else rows.stop)
                     for rows, *_ in index_map.values()})
    start, stop = blocks[0][0], blocks[-1][1]
    covered = sum(block_stop - block_start for block_start, block_stop in blocks)
    if covered != stop - start:
        raise ValueError(f"process {jax.process_index()} holds non-contiguous batch rows {blocks}; "
                         "order the mesh so each process's devices are adjacent on the batch axes")
    return start, stop


def global_batch(local: dict[str, np.ndarray], shardings: dict[str, NamedSharding], batch_axis: int,
                 global_batch_size: int) -> dict[str, jax.Array]:
    """Assembles each process's rows (see process_batch_rows) into one global jax.Array per key, each with its
    sharding from `batch_shardings`."""
    def assemble(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
        shape = list(array.shape)
        shape[batch_axis] = global_batch_size
        return jax.make_array_from_process_local_data(sharding, array, tuple(shape))

    return {key: assemble(value, shardings[key]) for key, value in local.items()}


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
