"""The device mesh from `config.mesh`, logical-axis rules, and placement of host batches on the mesh."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llm_jax.config import MESH_AXES

Rules = tuple[tuple[str, Any], ...]


def build_mesh(mesh_sizes: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes (data, fsdp, tensor) and Auto axis types, as linen's logical constraints need."""
    shape = tuple(mesh_sizes[axis] for axis in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def logical_rules(mesh_config: ml_collections.ConfigDict) -> Rules:
    """The rule table as hashable tuples (ConfigDict may hand back lists)."""
    return tuple((name, tuple(axes) if isinstance(axes, list) else axes)
                 for name, axes in mesh_config.logical_axis_rules)


def logical_sharding(mesh: Mesh, rules: Rules, logical_axes: Sequence[str | None]) -> NamedSharding:
    return NamedSharding(mesh, nn.logical_to_mesh_axes(tuple(logical_axes), rules))


def batch_sharding(mesh: Mesh, rules: Rules, *, stacked: bool) -> NamedSharding:
    """Sharding of a [batch, seq] array, or of a [steps, batch, seq] stack of them."""
    axes = (None, "batch", None) if stacked else ("batch", None)
    return logical_sharding(mesh, rules, axes)


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding, batch_axis: int) -> dict[str, jax.Array]:
    """Assembles each process's rows into one global jax.Array per key (one process: the rows are all)."""
    def assemble(array: np.ndarray) -> jax.Array:
        shape = list(array.shape)
        shape[batch_axis] *= jax.process_count()
        return jax.make_array_from_process_local_data(sharding, array, tuple(shape))

    return {key: assemble(value) for key, value in local.items()}


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
