"""Mesh presets, the one place a mesh layout is named: `apply_mesh(config, "fsdp_tensor")` sets `config.mesh`.

-1 takes the devices the other axes leave, so one preset fits any device count it divides: "fsdp_tensor" is
fsdp=4 x tensor=2 on 8 devices and fsdp=2 x tensor=2 on 4. On the command line:
`--config=experiments/X.py:mesh=fsdp_tensor` (see `configs/presets.py`).
"""

from __future__ import annotations

import ml_collections

from llm_jax.registry import Registry

MESHES: Registry[dict] = Registry("mesh preset")
MESHES.add("single", dict(data=1, fsdp=1, tensor=1))
MESHES.add("data", dict(data=-1, fsdp=1, tensor=1))
MESHES.add("fsdp", dict(data=1, fsdp=-1, tensor=1))
MESHES.add("tensor", dict(data=1, fsdp=1, tensor=-1))
MESHES.add("data_fsdp", dict(data=2, fsdp=-1, tensor=1))
MESHES.add("data_tensor", dict(data=2, fsdp=1, tensor=-1))
MESHES.add("fsdp_tensor", dict(data=1, fsdp=-1, tensor=2))
MESHES.add("data_fsdp_tensor", dict(data=2, fsdp=-1, tensor=2))


def apply_mesh(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """`config` with the mesh of preset `name` (an unknown name lists the known ones)."""
    config.mesh.update(**MESHES.get(name))
    return config
