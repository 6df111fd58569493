"""Runs a multi-process llm_jax.train job on this machine: N processes, each with M simulated CPU devices.

    python -m launch.local --num_processes=2 --devices_per_process=2 -- \\
        --config=experiments/python_docs.py:quick --workdir=runs/two_processes --config.mesh.data=4

Process I runs `python -m llm_jax.train ARGS --coordinator_address=127.0.0.1:PORT
--coordinator_bind_address=127.0.0.1:PORT --num_processes=N --process_id=I` with
XLA_FLAGS=--xla_force_host_platform_device_count=M and JAX_PLATFORMS=cpu, so the sharding and collectives
of a multi-host job can be exercised on one CPU. Process 0's coordinator (unauthenticated) listens on
loopback only, not on JAX's default of every interface. (With one process no coordinator is started:
that is a plain single-process run with M devices.) Process 0's output goes to stderr; the others' is
prefixed with "[process I] ", or written to --log_dir/process_I.log. When any process fails the launcher
names it, shows the end of its output, stops the rest and exits non-zero; SIGINT/SIGTERM are forwarded to
every process (the trainer checkpoints and stops; a second signal kills).
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Mapping, Sequence

from absl import app, flags

from launch.processes import DISTRIBUTED_FLAGS, LineSink, Timeouts, check_train_args, free_port, log, run_group

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
HOST = "127.0.0.1"  # the coordinator's address and the only interface it listens on
LAUNCHER_FLAGS = (*DISTRIBUTED_FLAGS, "coordinator_bind_address")


def define_flags() -> None:
    """The command-line flags (defined only when run as a program: importing this module defines none)."""
    flags.DEFINE_integer("num_processes", 2, "processes to start", lower_bound=1)
    flags.DEFINE_integer("devices_per_process", 1, "simulated CPU devices in each process", lower_bound=1)
    flags.DEFINE_integer("port", 0, "coordinator port on 127.0.0.1; 0 = a free port", lower_bound=0)
    # --log_dir is absl.logging's own flag (this launcher logs without absl): DIR/process_I.log and .pid
    flags.DEFINE_float("grace_period", 10.0, "seconds between SIGTERM and SIGKILL when stopping processes")
    flags.DEFINE_float("stop_timeout", 120.0, "seconds the processes get to checkpoint and exit after a forwarded "
                       "SIGINT/SIGTERM before they are killed")
    flags.DEFINE_float("timeout", 0.0, "stop the whole job after this many seconds (exit 124); 0 = no limit")


def xla_flags_with_device_count(existing: str, count: int) -> str:
    """`existing` XLA_FLAGS with any device-count flag replaced by one asking for `count` devices."""
    kept = [flag for flag in existing.split() if not flag.startswith(DEVICE_COUNT_FLAG)]
    return " ".join([*kept, f"{DEVICE_COUNT_FLAG}={count}"])


def process_env(base: Mapping[str, str], devices_per_process: int) -> dict[str, str]:
    """The environment of one process: `base` plus its own CPU device count and JAX_PLATFORMS=cpu."""
    env = dict(base)
    env["XLA_FLAGS"] = xla_flags_with_device_count(env.get("XLA_FLAGS", ""), devices_per_process)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONUNBUFFERED"] = "1"  # lines reach the launcher as they are printed, not at exit
    return env


def train_command(train_args: Sequence[str], num_processes: int, process_id: int, port: int) -> list[str]:
    """`python -m llm_jax.train ARGS` plus the coordinator flags of one process (none for a 1-process job).

    The coordinator is bound to loopback: every process is local, so no other machine needs to reach it.
    """
    command = [sys.executable, "-m", "llm_jax.train", *train_args]
    if num_processes > 1:
        command += [f"--coordinator_address={HOST}:{port}", f"--coordinator_bind_address={HOST}:{port}",
                    f"--num_processes={num_processes}", f"--process_id={process_id}"]
    return command


def make_sinks(num_processes: int, log_dir: str | None) -> list[LineSink]:
    """Process 0 to stderr (and its log file); the others to their log files, or to stderr with a prefix."""
    sinks = []
    for index in range(num_processes):
        path = os.path.join(log_dir, f"process_{index}.log") if log_dir else None
        if index == 0:
            sinks.append(LineSink(sys.stderr, log_path=path))
        else:
            sinks.append(LineSink(None if path else sys.stderr, prefix=f"[process {index}] ", log_path=path))
    return sinks


def _pid_file_writer(log_dir: str | None, on_start: Callable[[list[int]], None] | None) -> Callable[[list[int]], None]:
    """Writes DIR/process_I.pid for every process (so others can signal them), then calls `on_start`."""
    def started(pids: list[int]) -> None:
        if log_dir:
            for index, pid in enumerate(pids):
                with open(os.path.join(log_dir, f"process_{index}.pid"), "w") as f:
                    f.write(f"{pid}\n")
        if on_start is not None:
            on_start(pids)
    return started


def launch(train_args: list[str], num_processes: int, devices_per_process: int, *, port: int | None = None,
           log_dir: str | None = None, env: Mapping[str, str] | None = None, cwd: str | None = None,
           timeouts: Timeouts = Timeouts(), on_start: Callable[[list[int]], None] | None = None) -> int:
    """Runs the job and returns its exit status (0 = every process exited 0); see the module docstring.

    `env` is the base environment of the processes (default: this process's); `on_start` receives the
    processes' pids once all have started.
    """
    check_train_args(train_args, LAUNCHER_FLAGS)
    if num_processes < 1 or devices_per_process < 1:
        raise ValueError(f"num_processes={num_processes} and devices_per_process={devices_per_process} must be >= 1")
    port = port or free_port()
    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
    child_env = process_env(os.environ if env is None else env, devices_per_process)
    commands = [train_command(train_args, num_processes, index, port) for index in range(num_processes)]
    log(f"starting {num_processes} x llm_jax.train with {devices_per_process} CPU devices each"
        + (f", coordinator {HOST}:{port} (loopback only)" if num_processes > 1 else ""))
    status = run_group(commands, [child_env] * num_processes, make_sinks(num_processes, log_dir), cwd=cwd,
                       timeouts=timeouts, on_start=_pid_file_writer(log_dir, on_start))
    log("all processes finished" if status == 0 else f"job failed with exit status {status}")
    return status


def main(argv: list[str]) -> None:
    f = flags.FLAGS
    timeouts = Timeouts(grace=f.grace_period, stop=f.stop_timeout, total=f.timeout or None)
    try:
        status = launch(argv[1:], f.num_processes, f.devices_per_process, port=f.port or None,
                        log_dir=f.log_dir or None, timeouts=timeouts)
    except ValueError as error:
        raise app.UsageError(str(error)) from None
    except OSError as error:  # e.g. --log_dir not writable
        raise SystemExit(f"error: {error}") from None
    sys.exit(status)


if __name__ == "__main__":
    define_flags()
    app.run(main)
