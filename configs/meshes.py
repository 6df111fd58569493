"""Mesh presets: `apply_mesh(config, "fsdp_tensor")` sets `config.mesh`; -1 fills the remaining devices."""

from __future__ import annotations

import ml_collections

from llm_jax.registry import Registry

MESHES: Registry[dict] = Registry("mesh preset")
MESHES.add("data", dict(data=-1, fsdp=1, tensor=1))
MESHES.add("fsdp", dict(data=1, fsdp=-1, tensor=1))
MESHES.add("data_fsdp", dict(data=2, fsdp=-1, tensor=1))
MESHES.add("fsdp_tensor", dict(data=1, fsdp=-1, tensor=2))


def apply_mesh(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    config.mesh.update(**MESHES.get(name))
    return config
