"""The run lock and the metrics lock of a work directory, with real processes: refusal naming the holder, release
on SIGKILL despite forked and exec'd children, serialised metrics.jsonl changes, two trainers on one directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO_ROOT, run_module, subprocess_env
from launch import sweep
from llm_jax import workdir_lock
from llm_jax.errors import WorkdirError
from llm_jax.workdir_lock import acquire_run_lock, metrics_lock

# Holds the run lock of argv[1], starts a forked (multiprocessing, as Grain workers) and an exec'd child that
# outlive it, prints "FORKED_PID EXECD_PID" and waits to be killed.
HOLDER = """
import multiprocessing, subprocess, sys, time
from llm_jax.workdir_lock import acquire_run_lock
lock = acquire_run_lock(sys.argv[1], "holder")
forked = multiprocessing.get_context("fork").Process(target=time.sleep, args=(300,))
forked.start()
execd = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], close_fds=False)
print(forked.pid, execd.pid, flush=True)
time.sleep(300)
"""
# Under the metrics lock of argv[1]: prints "held", reads a line of stdin, appends argv[3] to the file argv[2].
APPENDER = """
import sys
from llm_jax.workdir_lock import metrics_lock
with metrics_lock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.readline()
    with open(sys.argv[2], "a") as f:
        f.write(sys.argv[3] + "\\n")
"""


def _python(script: str, *args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, *args], cwd=REPO_ROOT, env=subprocess_env(),
                            text=True, **kwargs)


def _kill(*pids: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def holder(tmp_path):
    """A process holding the run lock of tmp_path/run, and the pids of its forked and exec'd children."""
    process = _python(HOLDER, str(tmp_path / "run"), stdout=subprocess.PIPE)
    children = [int(pid) for pid in process.stdout.readline().split()]
    assert len(children) == 2, "the holder did not start"
    yield process, children
    _kill(process.pid, *children)
    process.wait()


def test_a_second_holder_fails_at_once_naming_the_first(holder, tmp_path):
    process, _ = holder
    started = time.monotonic()
    with pytest.raises(WorkdirError) as refused:
        acquire_run_lock(str(tmp_path / "run"), "second")
    assert time.monotonic() - started < 1.0
    message = str(refused.value)
    assert f"{tmp_path / 'run'} is in use by holder, pid {process.pid} on host " in message
    assert message.endswith("wait for it to finish or stop it")


def test_the_lock_is_free_once_the_holder_is_killed_though_its_children_live(holder, tmp_path):
    process, children = holder
    process.send_signal(signal.SIGKILL)
    process.wait()
    for child in children:
        os.kill(child, 0)  # still alive: raises ProcessLookupError otherwise
    with acquire_run_lock(str(tmp_path / "run"), "restart") as lock:
        assert not os.get_inheritable(lock.fd)
        identity = json.loads((tmp_path / "run" / workdir_lock.RUN_LOCK_FILE).read_text())
        assert identity["command"] == "restart" and identity["pid"] == os.getpid()
    with acquire_run_lock(str(tmp_path / "run"), "again"):
        pass  # released by the `with` above


def _wait_until_blocked_on_a_lock(process: subprocess.Popen) -> None:
    """Polls /proc/locks until `process` waits for a flock (a '->' line with its pid)."""
    if not os.path.exists("/proc/locks"):
        with pytest.raises(subprocess.TimeoutExpired):
            process.wait(timeout=1.0)
        return
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, "the second process went on while the first held the metrics lock"
        with open("/proc/locks") as f:
            if any(fields[1:2] == ["->"] and str(process.pid) in fields for fields in map(str.split, f)):
                return
        time.sleep(0.01)
    raise AssertionError("the second process never waited for the metrics lock")


def test_the_metrics_lock_makes_a_second_holder_wait(tmp_path):
    order = tmp_path / "order.txt"
    first = _python(APPENDER, str(tmp_path), str(order), "first", stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert first.stdout.readline().strip() == "held"
        second = _python(APPENDER, str(tmp_path), str(order), "second", stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE)
        _wait_until_blocked_on_a_lock(second)
        first.communicate("\n", timeout=60)
        assert second.communicate(timeout=60)[0].strip() == "held"
    finally:
        _kill(first.pid)
    assert (first.returncode, second.returncode) == (0, 0)
    assert order.read_text().split() == ["first", "second"]


def test_a_second_trainer_on_a_workdir_fails_at_once_and_the_first_finishes(tmp_path):
    workdir = tmp_path / "run"
    args = ["--config=experiments/python_docs.py:quick", f"--workdir={workdir}", "--config.train.steps=20"]
    first = subprocess.Popen([sys.executable, "-m", "llm_jax.train", *args], cwd=REPO_ROOT, env=subprocess_env(),
                             stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_holder(workdir, first)
        first.send_signal(signal.SIGSTOP)  # the first holds the lock, and keeps holding it while the second runs
        second = run_module("llm_jax.train", *args, timeout=120)
        first.send_signal(signal.SIGCONT)
        assert second.returncode == 1, second.stderr[-3000:]
        assert f"error: {workdir} is in use by llm_jax.train, pid {first.pid} on host " in second.stderr
        assert "Traceback" not in second.stderr and "model:" not in second.stderr, "the second began training"
        stderr = first.communicate(timeout=300)[1]
    finally:
        first.send_signal(signal.SIGCONT)
        _kill(first.pid)
    assert first.returncode == 0, stderr[-3000:]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval/loss" in r] == [20]


def _wait_for_holder(workdir, process: subprocess.Popen) -> None:
    """Polls DIR/.lock until `process` has written itself in as the holder."""
    path = workdir / workdir_lock.RUN_LOCK_FILE
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read()[-3000:]
        try:
            if json.loads(path.read_text())["pid"] == process.pid:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"{process.args} never took the lock of {workdir}")


def test_an_uncreatable_or_unwritable_directory_is_named(tmp_path):
    regular_file = tmp_path / "file"
    regular_file.write_text("")
    with pytest.raises(WorkdirError, match=f"cannot use {regular_file}/sub as a work directory: Not a directory"):
        acquire_run_lock(str(regular_file / "sub"), "train")
    with pytest.raises(WorkdirError, match="Not a directory"):
        with metrics_lock(str(regular_file / "sub")):
            pass
    if os.geteuid() == 0:
        pytest.skip("root can write a read-only directory")
    read_only = tmp_path / "read_only"
    read_only.mkdir(mode=0o555)
    with pytest.raises(WorkdirError, match=f"cannot use {read_only} as a work directory: Permission denied"):
        acquire_run_lock(str(read_only), "train")


def test_remote_and_secondary_process_locks_take_nothing(tmp_path, monkeypatch):
    warnings = []
    monkeypatch.setattr(workdir_lock.logging, "warning", lambda *args: warnings.append(args))
    monkeypatch.setattr(workdir_lock, "_warned_remote", False)
    for _ in range(2):
        with acquire_run_lock("gs://bucket/run", "train") as lock, metrics_lock("gs://bucket/run"):
            assert lock.fd is None
    assert len(warnings) == 1 and "gs://bucket/run" in warnings[0]
    with acquire_run_lock(str(tmp_path / "run"), "train", enabled=False) as lock:
        assert lock.fd is None and not (tmp_path / "run").exists()


def test_a_sweep_refuses_a_held_sweep_directory_but_a_dry_run_does_not(tmp_path):
    experiment = tmp_path / "tiny_sweep.py"
    experiment.write_text(f"import importlib.util\n"
                          f"_spec = importlib.util.spec_from_file_location('_docs', "
                          f"{str(REPO_ROOT / 'experiments' / 'python_docs.py')!r})\n"
                          "_docs = importlib.util.module_from_spec(_spec)\n_spec.loader.exec_module(_docs)\n"
                          "get_config = _docs.get_config\n\ndef get_sweep():\n    return [{'train.seed': 1}]\n")
    sweep_dir = str(tmp_path / "sweep")
    with acquire_run_lock(sweep_dir, "launch.sweep"):
        assert sweep.run_sweep(f"{experiment}:quick", sweep_dir, dry_run=True) == []
        with pytest.raises(sweep.SweepError, match=f"{sweep_dir} is in use by launch.sweep, pid {os.getpid()}"):
            sweep.run_sweep(f"{experiment}:quick", sweep_dir, backend="tpu")
    assert sweep.run_sweep(f"{experiment}:quick", sweep_dir, backend="tpu") == []
