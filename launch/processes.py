"""Supervising a group of child processes: stream their output, notice the first failure, stop the rest.

A multi-process JAX job is only as alive as its least alive process: when one dies, the others block in
a collective until a heartbeat timeout. The supervisor therefore ends the whole group as soon as any
child fails, names the child, and shows the tail of its output. Every wait here is bounded.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Callable, Mapping, Sequence, TextIO

DISTRIBUTED_FLAGS = ("coordinator_address", "num_processes", "process_id")  # JAX finds these on TPU pods and SLURM
TAIL_LINES = 40
POLL_SECONDS = 0.1


def free_port(host: str = "") -> int:
    """A TCP port nobody listens on right now (the kernel picks it when binding to port 0).

    The default host is every interface, so the port is free both for a coordinator bound to loopback
    (launch.local) and for one bound to every interface (JAX's default).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def check_train_args(train_args: Sequence[str], launcher_flags: Sequence[str] = DISTRIBUTED_FLAGS) -> None:
    """Rejects an empty llm_jax.train argument list, and the flags the launcher sets itself (`launcher_flags`;
    the others, e.g. --coordinator_bind_address for TPU/SLURM, pass through)."""
    if not train_args:
        raise ValueError("no llm_jax.train arguments: give them after `--`, e.g. "
                         "-- --config=experiments/python_docs.py:quick --workdir=runs/local")
    for arg in train_args:
        name = arg.split("=", 1)[0].lstrip("-")
        if arg.startswith("-") and name in launcher_flags:
            found = " (or found by jax on TPU pods and SLURM)" if name in DISTRIBUTED_FLAGS else ""
            raise ValueError(f"--{name} is set by the launcher{found}; remove it from the train arguments")


def describe_status(returncode: int) -> str:
    """'exited with status 3' or 'was killed by signal 9 (SIGKILL)', from a Popen return code."""
    if returncode >= 0:
        return f"exited with status {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = "unknown signal"
    return f"was killed by signal {-returncode} ({name})"


def shell_status(returncode: int) -> int:
    """The exit status a shell would report: the code itself, or 128 + signal number."""
    return returncode if returncode >= 0 else 128 - returncode


class LineSink:
    """Where one child's output lines go: a stream (optionally prefixed) and/or a log file; thread-safe."""

    _stream_lock = threading.Lock()

    def __init__(self, stream: TextIO | None, prefix: str = "", log_path: str | None = None):
        self.stream, self.prefix = stream, prefix
        self.log = open(log_path, "w", encoding="utf-8") if log_path else None

    def write(self, line: str) -> None:
        if self.stream is not None:
            with self._stream_lock:
                self.stream.write(self.prefix + line)
                self.stream.flush()
        if self.log is not None:
            self.log.write(line)
            self.log.flush()

    def close(self) -> None:
        if self.log is not None:
            self.log.close()


@dataclasses.dataclass
class Child:
    """One supervised process: its index in the group, the Popen, and the last lines it printed."""

    index: int
    popen: subprocess.Popen
    sink: LineSink
    tail: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=TAIL_LINES))
    reader: threading.Thread | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def signal_group(self, signum: int) -> None:
        """Signals the child's process group (it leads a session of its own), so helpers it spawned go too."""
        if not self.running():
            return
        try:
            os.killpg(self.popen.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass


def _read_output(child: Child) -> None:
    """Copies the child's merged stdout/stderr to its sink line by line, keeping the tail."""
    assert child.popen.stdout is not None
    for raw in iter(child.popen.stdout.readline, b""):
        line = raw.decode("utf-8", errors="replace")
        if not line.endswith("\n"):
            line += "\n"
        child.tail.append(line)
        child.sink.write(line)
    child.popen.stdout.close()


def _wait_for_exit(child: Child, exits: queue.Queue) -> None:
    exits.put((child.index, child.popen.wait()))


def start_child(index: int, command: Sequence[str], env: Mapping[str, str], cwd: str | None, sink: LineSink,
                exits: queue.Queue) -> Child:
    """Starts one child in its own session (so the launcher alone decides which signals reach it)."""
    popen = subprocess.Popen(list(command), env=dict(env), cwd=cwd, stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    child = Child(index, popen, sink)
    child.reader = threading.Thread(target=_read_output, args=(child,), daemon=True, name=f"output-{index}")
    child.reader.start()
    threading.Thread(target=_wait_for_exit, args=(child, exits), daemon=True, name=f"wait-{index}").start()
    return child


def stop_all(children: Sequence[Child], grace_seconds: float, first_signal: int = signal.SIGTERM) -> None:
    """Sends `first_signal` to every running child, then SIGKILL to those still running after the grace period."""
    if first_signal != signal.SIGKILL:
        for child in children:
            child.signal_group(first_signal)
        deadline = time.monotonic() + grace_seconds
        while any(child.running() for child in children) and time.monotonic() < deadline:
            time.sleep(POLL_SECONDS)
        for child in children:
            if child.running():
                log(f"process {child.index} (pid {child.pid}) still running {grace_seconds:g}s after signal "
                    f"{first_signal}: SIGKILL")
    for child in children:
        child.signal_group(signal.SIGKILL)
    for child in children:
        try:
            child.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            log(f"process {child.index} (pid {child.pid}) survived SIGKILL for 10s; giving up on it")


def join_readers(children: Sequence[Child]) -> None:
    """Joins the output readers; bounded, since a grandchild may still hold a pipe open."""
    for child in children:
        if child.reader is not None:
            child.reader.join(timeout=5)


def log(message: str) -> None:
    """A launcher message on stderr, marked so it stands out from the children's output."""
    sys.stderr.write(f"[launcher] {message}\n")
    sys.stderr.flush()


class SignalForwarder:
    """Records SIGINT/SIGTERM sent to the launcher so the supervision loop can pass them to the children.

    Handlers can only be installed from the main thread; elsewhere (a launcher run in a thread) the
    signals keep their default behaviour.
    """

    def __init__(self):
        self.received: list[int] = []
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "SignalForwarder":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        self.received.append(signum)

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


@dataclasses.dataclass(frozen=True)
class Timeouts:
    """Bounds on the supervisor's waits, in seconds."""

    grace: float = 10.0  # after SIGTERM to the survivors of a failure, before SIGKILL
    stop: float = 120.0  # after a forwarded SIGINT/SIGTERM (the trainer checkpoints first), before SIGKILL
    finish: float = 300.0  # after one process exited 0, for the others to exit too
    total: float | None = None  # the whole job; None = unbounded


def report_failure(child: Child, returncode: int) -> None:
    """Names the failed child, its status, and the last lines it printed."""
    log(f"process {child.index} (pid {child.pid}) {describe_status(returncode)}; stopping the other processes")
    if child.reader is not None:
        child.reader.join(timeout=2)  # the last lines it printed before dying
    tail = "".join(child.tail)
    if tail:
        sys.stderr.write(f"[launcher] last {len(child.tail)} lines of process {child.index}:\n{tail}")
        sys.stderr.flush()


def _forward_stop(children: Sequence[Child], forwarder: SignalForwarder, handled: int,
                  stop_deadline: float | None, timeouts: Timeouts) -> tuple[int, float | None]:
    """Forwards newly received signals; a second one, or the stop timeout, escalates to SIGKILL."""
    for signum in forwarder.received[handled:]:
        if stop_deadline is None:
            log(f"received signal {signum}: forwarding it to {len(children)} processes")
            for child in children:
                child.signal_group(signum)
            stop_deadline = time.monotonic() + timeouts.stop
        else:
            log(f"received signal {signum} again: killing all processes")
            stop_all(children, 0, signal.SIGKILL)
            stop_deadline = math.inf
    if stop_deadline is not None and time.monotonic() > stop_deadline:
        log(f"processes still running {timeouts.stop:g}s after the forwarded signal: killing them")
        stop_all(children, 0, signal.SIGKILL)
        stop_deadline = math.inf
    return len(forwarder.received), stop_deadline


def _overdue(start: float, first_success: float | None, timeouts: Timeouts) -> str | None:
    """Why the job has run out of time, or None."""
    now = time.monotonic()
    if timeouts.total is not None and now - start > timeouts.total:
        return f"the job ran longer than its {timeouts.total:g}s limit"
    if first_success is not None and now - first_success > timeouts.finish:
        return f"a process finished but the others were still running {timeouts.finish:g}s later"
    return None


def supervise(children: Sequence[Child], exits: queue.Queue, forwarder: SignalForwarder, timeouts: Timeouts) -> int:
    """Waits for the group: 0 when every child exits 0; otherwise stops the rest and returns non-zero.

    The status is the first failed child's (128 + signal when it was killed), 128 + signal when the
    launcher itself was signalled, and 124 when a time limit ran out.
    """
    start, first_success, remaining = time.monotonic(), None, len(children)
    handled, stop_deadline = 0, None
    while remaining:
        handled, stop_deadline = _forward_stop(children, forwarder, handled, stop_deadline, timeouts)
        reason = _overdue(start, first_success, timeouts)
        if reason is not None:
            log(f"{reason}: stopping all processes")
            stop_all(children, timeouts.grace)
            return 124
        try:
            index, returncode = exits.get(timeout=POLL_SECONDS)
        except queue.Empty:
            continue
        remaining -= 1
        if returncode == 0:
            first_success = first_success or time.monotonic()
        elif not forwarder.received:
            report_failure(children[index], returncode)
            stop_all(children, timeouts.grace)
            join_readers(children)  # their last lines first, then the verdict
            log(f"stopped all processes because process {index} {describe_status(returncode)}")
            return shell_status(returncode)
    return 128 + forwarder.received[0] if forwarder.received else 0


def run_group(commands: Sequence[Sequence[str]], envs: Sequence[Mapping[str, str]], sinks: Sequence[LineSink],
              cwd: str | None = None, timeouts: Timeouts = Timeouts(),
              on_start: Callable[[list[int]], None] | None = None) -> int:
    """Starts one child per command, supervises them (see `supervise`) and returns the group's exit status."""
    exits: queue.Queue = queue.Queue()
    children: list[Child] = []
    with SignalForwarder() as forwarder:
        try:
            for index, (command, env, sink) in enumerate(zip(commands, envs, sinks, strict=True)):
                children.append(start_child(index, command, env, cwd, sink, exits))
            if on_start is not None:
                on_start([child.pid for child in children])
            return supervise(children, exits, forwarder, timeouts)
        finally:
            stop_all(children, timeouts.grace)
            join_readers(children)
            for sink in sinks:
                sink.close()
