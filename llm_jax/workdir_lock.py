"""One command at a time per work directory, and no metrics.jsonl line lost to a concurrent rewrite.

    with acquire_run_lock(workdir, "llm_jax.train", enabled=jax.process_index() == 0):
        ...                                   # a second trainer on workdir fails at once, naming this one
    with metrics_lock(workdir):
        ...                                   # open, append or rewrite DIR/metrics.jsonl, close

Both are `fcntl.flock` locks on files in the directory (DIR/.lock, DIR/.metrics.lock), so the OS releases them
when the process dies: a SIGKILLed run never blocks its own restart. flock locks belong to the open file
description, which a fork shares; forked children (multiprocessing, Grain workers) close their copy at once,
so a child that outlives its parent does not keep the directory locked. The descriptors are not inherited by
exec'd programs either. Remote paths (gs://...) cannot be locked: they are used unlocked, with one warning.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import time
from typing import Iterator

from absl import logging

from llm_jax.errors import WorkdirError

RUN_LOCK_FILE = ".lock"
METRICS_LOCK_FILE = ".metrics.lock"
_HOLDER_WAIT_S = 1.0  # how long a refused command waits for the holder to finish writing its identity

_held_fds: set[int] = set()  # lock descriptors of this process, closed in forked children
_warned_remote = False


def _close_held_in_child() -> None:
    """After a fork: closes the child's copies of the lock descriptors (the parent keeps its locks)."""
    for fd in _held_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    _held_fds.clear()


os.register_at_fork(after_in_child=_close_held_in_child)


def _is_remote(directory: str) -> bool:
    """Whether `directory` is a URL (gs://, s3://...), which flock cannot lock; warns once per process."""
    global _warned_remote
    if "://" not in directory:
        return False
    if not _warned_remote:
        _warned_remote = True
        logging.warning("%s is a remote path: it cannot be locked, so nothing stops a second command from using "
                        "it at the same time", directory)
    return True


def _open_lock_file(directory: str, name: str) -> int:
    """A non-inheritable read-write descriptor of DIR/name, creating the directory and file if missing."""
    try:
        os.makedirs(directory, exist_ok=True)
        return os.open(os.path.join(directory, name), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as error:
        where = error.filename or directory
        raise WorkdirError(f"cannot use {directory} as a work directory: {error.strerror} ({where}); pass a "
                           "directory this user can create and write") from None


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _write_identity(fd: int, command: str) -> None:
    """Replaces the lock file's text with who holds it, for the message of a refused command."""
    identity = {"command": command, "pid": os.getpid(), "host": socket.gethostname(), "since": _now()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(identity) + "\n").encode(), 0)


def _describe_holder(fd: int) -> str:
    """'llm_jax.train, pid 123 on host h since ...' from the lock file, waiting briefly for a new holder to
    write it; 'another process' if it never does."""
    deadline = time.monotonic() + _HOLDER_WAIT_S
    while True:
        try:
            holder = json.loads(os.pread(fd, 4096, 0))
            return f"{holder['command']}, pid {holder['pid']} on host {holder['host']} since {holder['since']}"
        except (ValueError, KeyError, TypeError):
            if time.monotonic() > deadline:
                return "another process"
            time.sleep(0.02)


class DirectoryLock:
    """A flock'ed file of a directory (or a stand-in that holds nothing); a context manager that releases it."""

    def __init__(self, directory: str, fd: int | None = None):
        self.directory = directory
        self.fd = fd
        self._pid = os.getpid()
        if fd is not None:
            _held_fds.add(fd)

    def release(self) -> None:
        """Unlocks and closes; a no-op if nothing is held, or in a forked child (whose copy is already closed)."""
        fd, self.fd = self.fd, None
        if fd is None or os.getpid() != self._pid:
            return
        _held_fds.discard(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __enter__(self) -> "DirectoryLock":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def acquire_run_lock(directory: str, command: str, *, enabled: bool = True) -> DirectoryLock:
    """Takes DIR/.lock for the life of `command` (e.g. "llm_jax.train"), creating DIR if missing.

    Raises WorkdirError at once, naming the holder, if another command holds it, or naming the OS error if the
    directory cannot be created or written. `enabled=False` (JAX processes other than 0 of a multi-process job)
    and remote paths take nothing. Use as `with acquire_run_lock(...):`.
    """
    if not enabled or _is_remote(directory):
        return DirectoryLock(directory)
    lock = DirectoryLock(directory, _open_lock_file(directory, RUN_LOCK_FILE))
    try:
        fcntl.flock(lock.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        _write_identity(lock.fd, command)
    except BlockingIOError:
        holder = _describe_holder(lock.fd)
        lock.release()
        raise WorkdirError(f"{directory} is in use by {holder}: wait for it to finish or stop it") from None
    except OSError as error:
        lock.release()
        raise WorkdirError(f"cannot lock {os.path.join(directory, RUN_LOCK_FILE)}: {error.strerror}") from None
    return lock


@contextlib.contextmanager
def metrics_lock(directory: str) -> Iterator[None]:
    """Holds DIR/.metrics.lock (blocking) around a change of DIR/metrics.jsonl: an append by evaluate, or the
    trainer's rewrite on resume, so neither loses the other's lines. Nothing is locked for remote paths."""
    if _is_remote(directory):
        yield
        return
    with DirectoryLock(directory, _open_lock_file(directory, METRICS_LOCK_FILE)) as lock:
        fcntl.flock(lock.fd, fcntl.LOCK_EX)
        yield
