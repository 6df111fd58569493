"""Joining a multi-process JAX job: explicit coordinator flags, cluster auto-detection, or one process.

On TPU pods and SLURM allocations `jax.distributed.initialize()` finds the coordinator itself; elsewhere
(several local processes, hand-started hosts) the coordinator address, process count and id are given.
CPU processes exchange data through gloo collectives.
"""

from __future__ import annotations

import dataclasses
import os

import jax
from absl import logging

from llm_jax.config import ConfigError


@dataclasses.dataclass(frozen=True)
class DistributedOptions:
    coordinator_address: str | None = None  # host:port of process 0
    num_processes: int | None = None
    process_id: int | None = None
    initialization_timeout_s: int = 120  # an unreachable coordinator fails after this, never hangs
    heartbeat_timeout_s: int = 60  # a dead peer ends the job after this

    @property
    def explicit(self) -> bool:
        return self.coordinator_address is not None


def cluster_detected() -> bool:
    """A multi-process SLURM step or a multi-worker TPU pod slice, where JAX finds the coordinator itself."""
    slurm_tasks = int(os.environ.get("SLURM_NTASKS", "1") or 1)
    tpu_workers = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return slurm_tasks > 1 or "," in tpu_workers


def initialize(options: DistributedOptions) -> None:
    """Initialises jax.distributed when the run spans several processes; a no-op for one process."""
    if options.explicit:
        if options.num_processes is None or options.process_id is None:
            raise ConfigError("--coordinator_address needs --num_processes and --process_id as well")
        if not 0 <= options.process_id < options.num_processes:
            raise ConfigError(f"--process_id={options.process_id} must be in [0, --num_processes={options.num_processes})")
    elif not cluster_detected():
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=options.coordinator_address, num_processes=options.num_processes,
        process_id=options.process_id, initialization_timeout=options.initialization_timeout_s,
        heartbeat_timeout_seconds=options.heartbeat_timeout_s)
    logging.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())
