"""Ahead-of-time check: compile the train step for the configured mesh without allocating the model,
and report per-device memory, so a config can be sized before it burns accelerator time."""

from __future__ import annotations

import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from llm_jax.sharding import batch_shardings
from llm_jax.training.run import Run, build_run, jit_train_chunk


def per_device_bytes(abstract_tree: Any) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard of each leaf)."""
    total = 0
    for leaf in jax.tree.leaves(abstract_tree):
        shard_shape = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shard_shape) * jnp.dtype(leaf.dtype).itemsize
    return total


def abstract_batches(run: Run) -> dict[str, jax.ShapeDtypeStruct]:
    """A chunk of train batches as the task's batch spec declares them: the keys training feeds."""
    cfg = run.config
    spec = run.task.batch_spec()
    shardings = batch_shardings(run.mesh, run.rules, spec, stacked=True)
    leading = (cfg.train.steps_per_dispatch, cfg.train.batch_size)
    return {key: jax.ShapeDtypeStruct(leading + field.shape, field.dtype, sharding=shardings[key])
            for key, field in spec.items()}


def compile_report(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Compiles one chunk of train steps from abstract inputs; returns sizes in bytes per device."""
    run = build_run(config, workdir)
    jitted = jit_train_chunk(run)
    start = time.perf_counter()
    with jax.set_mesh(run.mesh), run.rules_context():
        compiled = jitted.lower(run.abstract_state, abstract_batches(run)).compile()
    memory = compiled.memory_analysis()
    num_params = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(run.abstract_state.params))
    report = {
        "mesh": dict(run.mesh.shape),
        "parameters": num_params,
        "params_bytes_per_device": per_device_bytes(run.abstract_state.params),
        "optimizer_bytes_per_device": per_device_bytes(run.abstract_state.opt_state),
        "compile_seconds": time.perf_counter() - start,
    }
    if memory is not None:
        report.update(argument_bytes=memory.argument_size_in_bytes, output_bytes=memory.output_size_in_bytes,
                      temp_bytes=memory.temp_size_in_bytes, alias_bytes=memory.alias_size_in_bytes,
                      peak_bytes_estimate=memory.argument_size_in_bytes + memory.output_size_in_bytes
                      + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
    return report
