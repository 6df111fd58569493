"""The train state and its creation directly in sharded form (eval_shape -> shardings -> jitted init)."""

from __future__ import annotations

import math
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec

from llm_jax.errors import ConfigError
from llm_jax.sharding import Rules, replicated


@flax.struct.dataclass
class TrainState:
    """Everything a step changes: `step` counts completed optimizer updates."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array  # raw uint32 key data, so checkpoints hold plain arrays


ModelInputs = Callable[[], dict[str, Any]]  # () -> the model's example keyword inputs (batch of one, zeros)


def _init_fn(model: nn.Module, tx: optax.GradientTransformation, inputs: ModelInputs):
    def init(seed_key: jax.Array) -> TrainState:
        params_key, dropout_key = jax.random.split(seed_key)
        params = nn.unbox(model.init({"params": params_key}, **inputs())["params"])
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          rng=jax.random.key_data(dropout_key))

    return init


def abstract_params(model: nn.Module, inputs: ModelInputs) -> Any:
    """The boxed (logically partitioned) parameter shapes, nothing allocated."""
    return jax.eval_shape(lambda key: model.init({"params": key}, **inputs()), jax.random.key(0))["params"]


def state_shardings(model: nn.Module, tx: optax.GradientTransformation, inputs: ModelInputs, mesh: Mesh,
                    rules: Rules) -> TrainState:
    """NamedShardings of every state leaf: params by their logical axes, optimizer moments like their
    params, everything else replicated."""
    boxed = abstract_params(model, inputs)
    logical_specs = nn.get_partition_spec(boxed)
    param_shardings = nn.logical_to_mesh_sharding(logical_specs, mesh, rules)
    _check_divisible(nn.unbox(boxed), logical_specs, param_shardings)
    abstract = jax.eval_shape(_init_fn(model, tx, inputs), jax.random.key(0))
    opt_shardings = optax.tree_map_params(  # frozen parameters (train.freeze) have no moments: MaskedNode
        tx, lambda leaf, sharding: leaf if isinstance(leaf, optax.MaskedNode) else sharding, abstract.opt_state,
        param_shardings, transform_non_params=lambda _: replicated(mesh),
        is_leaf=lambda leaf: isinstance(leaf, optax.MaskedNode))
    return TrainState(step=replicated(mesh), params=param_shardings, opt_state=opt_shardings,
                      rng=replicated(mesh))


def _check_divisible(params: Any, logical_specs: Any, shardings: Any) -> None:
    """Every sharded parameter dimension must divide by its mesh axes; the error names both, before compiling."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    specs = jax.tree.leaves(logical_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    for (path, leaf), logical, sharding in zip(flat, specs, jax.tree.leaves(shardings)):
        for dim, (size, mesh_axes) in enumerate(zip(leaf.shape, sharding.spec)):
            if mesh_axes is None:
                continue
            axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
            parts = math.prod(sharding.mesh.shape[axis] for axis in axes)
            if size % parts:
                raise ConfigError(
                    f"parameter {jax.tree_util.keystr(path)} {leaf.shape}: its {logical[dim]!r} dimension ({size}) "
                    f"is split over mesh axes {axes} ({parts} ways) and does not divide; change the model size "
                    "(heads, d_model, d_ff) or the mesh, or map the logical axis elsewhere in mesh.logical_axis_rules")


def abstract_state(model: nn.Module, tx: optax.GradientTransformation, inputs: ModelInputs,
                   shardings: TrainState) -> TrainState:
    """ShapeDtypeStructs with shardings: the restore target of a checkpoint."""
    abstract = jax.eval_shape(_init_fn(model, tx, inputs), jax.random.key(0))
    return jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                        abstract, shardings)


def init_state(model: nn.Module, tx: optax.GradientTransformation, inputs: ModelInputs, seed: int,
               shardings: TrainState) -> TrainState:
    """Initialises every leaf directly on its shards; nothing is materialised whole on one device."""
    init = jax.jit(_init_fn(model, tx, inputs), out_shardings=shardings)
    return init(jax.random.key(seed))
