"""XLA flags llm_jax sets before JAX starts its backend (XLA_FLAGS is read once, at start-up).

On CPU, jaxlib 0.10 sends dots *and* the elementwise work around them into YNNPACK fusions; limiting
YNNPACK to the dots made the shakespeare_char train step 1.4-1.5x faster on a 2-core machine
(benchmarks/shakespeare_char_throughput.py). The flag is CPU-only, so GPU and TPU runs ignore it. It is
only added for jaxlib versions known to accept it (an unknown flag aborts XLA), and never when the user's
XLA_FLAGS already set it.

`mesh.cpu_devices` splits the CPU into several XLA devices (`split_cpu`, called by the train CLI before
JAX starts). XLA:CPU runs one program as a graph of small kernels; for a small model most of them leave a
core idle (the recipe's step kept 2 cores busy ~60% of its time, benchmarks/cpu_step_profile.py). With one
device per core, the batch is sharded over the `data` mesh axis and each core runs its own shard's program,
with one gradient all-reduce per step in memory. GPU and TPU runs are unaffected: the mesh is built from
their devices, not the CPU's.
"""

from __future__ import annotations

import importlib.metadata
import os

from llm_jax import host_cpu

CPU_FLAGS = {"--xla_cpu_experimental_ynn_fusion_type": "dot"}
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
VERIFIED_JAXLIB_MINOR = ((0, 10),)


def _jaxlib_minor() -> tuple[int, int] | None:
    try:
        major, minor = importlib.metadata.version("jaxlib").split(".")[:2]
        return int(major), int(minor)
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None


def apply() -> None:
    if _jaxlib_minor() not in VERIFIED_JAXLIB_MINOR:
        return
    flags = os.environ.get("XLA_FLAGS", "")
    extra = [f"{name}={value}" for name, value in CPU_FLAGS.items() if name not in flags]
    if extra:
        os.environ["XLA_FLAGS"] = " ".join([flags, *extra]).strip()


def cpu_device_count(requested: int, batch_size: int, grad_accum_steps: int, cores: int | None = None) -> int:
    """The CPU devices `mesh.cpu_devices=requested` asks for: -1 = the most devices, at most one per usable
    core, whose data shards each hold a whole number of micro-batch rows; 0 = XLA's default (1)."""
    if requested >= 1:
        return requested
    if requested == 0:
        return 1
    cores = cores or host_cpu.usable_cores()
    return max(n for n in range(1, cores + 1) if batch_size % (n * grad_accum_steps) == 0)


def split_cpu(requested: int, batch_size: int, grad_accum_steps: int) -> int | None:
    """Sets XLA_FLAGS' CPU device count for `mesh.cpu_devices`, before JAX starts; returns the count set, or
    None when nothing changed (0 or 1 device asked for, or XLA_FLAGS already sets a count, as launch.local and
    the test suite do: theirs wins)."""
    flags = os.environ.get("XLA_FLAGS", "")
    count = cpu_device_count(requested, batch_size, grad_accum_steps)
    if count <= 1 or DEVICE_COUNT_FLAG in flags:
        return None
    os.environ["XLA_FLAGS"] = f"{flags} {DEVICE_COUNT_FLAG}={count}".strip()
    return count


def without_device_count(flags: str) -> str:
    """`flags` (XLA_FLAGS) less the CPU device count: what a host-wide measurement such as the CPU peak
    depends on (splitting the CPU into devices leaves the cores and their kernels as they were)."""
    return " ".join(flag for flag in flags.split() if not flag.startswith(DEVICE_COUNT_FLAG))
