"""Joining a multi-process JAX job: explicit coordinator flags, cluster auto-detection, or one process.

On TPU pods and SLURM allocations `jax.distributed.initialize()` finds the coordinator itself; elsewhere
(several local processes, hand-started hosts) the coordinator address, process count and id are given.
CPU processes exchange data through gloo collectives. Process 0's coordination service is unauthenticated:
JAX binds it to every interface unless a bind address is given (launch.local gives loopback).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time

import jax
from absl import logging

from llm_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class DistributedOptions:
    coordinator_address: str | None = None  # host:port of process 0
    num_processes: int | None = None
    process_id: int | None = None
    initialization_timeout_s: int = 120  # an unreachable coordinator fails after this, never hangs
    heartbeat_timeout_s: int = 60  # a dead peer ends the job after this
    auto: bool = False  # call jax.distributed.initialize() and let JAX detect the cluster (Cloud TPU pods)
    coordinator_bind_address: str | None = None  # HOST:PORT process 0's coordinator listens on; None = JAX's [::]:PORT

    @property
    def explicit(self) -> bool:
        return self.coordinator_address is not None


def cluster_detected() -> bool:
    """A multi-process SLURM step or a multi-worker TPU pod slice, where JAX finds the coordinator itself."""
    slurm_tasks = int(os.environ.get("SLURM_NTASKS", "1") or 1)
    tpu_workers = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return slurm_tasks > 1 or "," in tpu_workers


def wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Polls HOST:PORT until process 0's coordinator accepts connections; a clear error after timeout_s
    (JAX itself aborts the process with a C++ trace in that case)."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=2):
                return
        except OSError as error:
            if time.monotonic() > deadline:
                raise ConfigError(f"cannot reach the coordinator at --coordinator_address={address} within "
                                  f"{timeout_s}s ({error}); is process 0 running and the port open?") from None
            time.sleep(0.5)


def check_bind_address(address: str) -> None:
    """Rejects a bind address without a port (or with an unbracketed IPv6 host) early: JAX would abort
    process 0 with a C++ trace instead."""
    host, _, port = address.rpartition(":")
    unbracketed_ipv6 = ":" in host and not (host.startswith("[") and host.endswith("]"))
    if not host or not port.isdigit() or unbracketed_ipv6:
        raise ConfigError(f"--coordinator_bind_address={address} must be HOST:PORT with the coordinator's port, "
                          "e.g. 10.0.0.5:1234 or [::1]:1234")


def initialize(options: DistributedOptions) -> None:
    """Initialises jax.distributed when the run spans several processes; a no-op for one process."""
    if options.coordinator_bind_address is not None:
        check_bind_address(options.coordinator_bind_address)
    if options.explicit:
        if options.num_processes is None or options.process_id is None:
            raise ConfigError("--coordinator_address needs --num_processes and --process_id as well")
        if not 0 <= options.process_id < options.num_processes:
            raise ConfigError(f"--process_id={options.process_id} must be in [0, --num_processes={options.num_processes})")
        if options.process_id != 0:
            wait_for_coordinator(options.coordinator_address, options.initialization_timeout_s)
    elif not (options.auto or cluster_detected()):
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=options.coordinator_address, num_processes=options.num_processes,
        process_id=options.process_id, initialization_timeout=options.initialization_timeout_s,
        heartbeat_timeout_seconds=options.heartbeat_timeout_s,
        coordinator_bind_address=options.coordinator_bind_address)
    logging.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())
