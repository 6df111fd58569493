"""Trains, evaluates and checkpoints; re-running with the same --workdir resumes.

    python -m llm_jax.train --config=experiments/shakespeare_char.py --workdir=runs/shakespeare_char
    python -m llm_jax.train --config=... --workdir=... --compile_only     # per-device memory, no training
    python -m llm_jax.train --config=... --workdir=... --profile_steps=20:30  # trace to DIR/profile/

Multi-process: on TPU pods and SLURM the coordinator is found automatically; elsewhere pass
--coordinator_address=HOST:PORT --num_processes=N --process_id=I to every process (launch.local does).
"""

from __future__ import annotations

import json

from absl import app, flags, logging

from llm_jax import distributed, xla_defaults
from llm_jax.cli import quiet_library_logs, run_reporting_errors
from llm_jax.experiment_files import define_experiment_flag

_CONFIG = define_experiment_flag("config", "experiment file, e.g. experiments/shakespeare_char.py[:arg]")
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory: config.json, metrics, checkpoints")
_COMPILE_ONLY = flags.DEFINE_bool("compile_only", False, "compile the train step, print per-device memory, exit")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (multi-process runs)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "processes in the job (with --coordinator_address)")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index (with --coordinator_address)")
_BIND_ADDRESS = flags.DEFINE_string("coordinator_bind_address", None, "HOST:PORT process 0's (unauthenticated) "
                                    "coordinator listens on; default: every interface, [::]:PORT of the coordinator "
                                    "address. launch.local uses 127.0.0.1:PORT")
_JAX_DISTRIBUTED = flags.DEFINE_bool("jax_distributed", False, "call jax.distributed.initialize() with JAX's own "
                                     "cluster detection (Cloud TPU pod slices; SLURM is detected without it)")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool("allow_config_change", False, "resume although keys that change the "
                                          "parameters, optimizer state or data stream differ from the run's")
_RESTORE_FALLBACK = flags.DEFINE_bool("restore_fallback", False, "when the newest checkpoint cannot be restored, "
                                      "resume from the newest one that can (the unreadable ones are moved to "
                                      "DIR/corrupt_checkpoints)")
_PROFILE_STEPS = flags.DEFINE_string("profile_steps", None, "A:B: write a jax.profiler trace of updates A+1..B "
                                     "(widened to whole dispatches of train.steps_per_dispatch) to DIR/profile/, "
                                     "for TensorBoard's profile plugin or Perfetto")
_INIT_TIMEOUT = flags.DEFINE_integer("distributed_timeout", 120, "seconds to wait for the coordinator and peers")
flags.mark_flags_as_required(["config", "workdir"])


def _run() -> None:
    from llm_jax.training.profiling import ProfileWindow

    profile_steps = None if _PROFILE_STEPS.value is None else ProfileWindow.parse(_PROFILE_STEPS.value)
    config = _CONFIG.value
    cpu_devices = xla_defaults.split_cpu(config.mesh.cpu_devices, config.train.batch_size,
                                         config.optimizer.grad_accum_steps)  # before JAX starts its backend
    if cpu_devices:
        logging.info("mesh.cpu_devices=%s: the CPU runs as %d XLA devices", config.mesh.cpu_devices, cpu_devices)
    distributed.initialize(distributed.DistributedOptions(
        _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, initialization_timeout_s=_INIT_TIMEOUT.value,
        heartbeat_timeout_s=_INIT_TIMEOUT.value, auto=_JAX_DISTRIBUTED.value,
        coordinator_bind_address=_BIND_ADDRESS.value))
    import jax
    from llm_jax.workdir_lock import acquire_run_lock

    if jax.process_index() != 0:
        logging.set_verbosity(logging.WARNING)  # one process reports progress; all report problems
    with acquire_run_lock(_WORKDIR.value, "llm_jax.train", enabled=jax.process_index() == 0):
        from llm_jax.training import aot, loop  # after jax.distributed: these modules may touch devices

        if _COMPILE_ONLY.value:
            report = aot.compile_report(_CONFIG.value, _WORKDIR.value)
            logging.info("compiled: %s", report)
            print(json.dumps(report))
            return
        loop.train(_CONFIG.value, _WORKDIR.value, allow_config_change=_ALLOW_CONFIG_CHANGE.value,
                   restore_fallback=_RESTORE_FALLBACK.value, profile_steps=profile_steps)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    quiet_library_logs()
    run_reporting_errors(_run)


if __name__ == "__main__":
    app.run(main)
