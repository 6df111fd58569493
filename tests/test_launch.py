"""The launchers: N processes train exactly like one, a dead process ends the job quickly and by name, an
unreachable coordinator fails instead of hanging, and the TPU / SLURM commands say what they should."""

from __future__ import annotations

import concurrent.futures
import ipaddress
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import REPO_ROOT, needs, subprocess_env
from launch import local, processes, slurm, tpu

QUICK = ["--config=experiments/python_docs.py:quick", "--config.train.log_every=1",
         "--config.train.steps_per_dispatch=1", "--config.train.eval_every=0", "--config.train.eval_steps=1",
         "--config.train.checkpoint_every=0"]
# The mesh presets (configs/meshes.py) of test_two_processes_train_like_one, on 4 devices: fsdp=2 x tensor=2 and
# tensor=4 (its docstring says why these two cover the three kinds).
MESHES = ("fsdp_tensor", "tensor")
SPACED_ARG = "--config.data.path=my corpus.txt"


def train_losses(workdir) -> list[tuple[int, float]]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [(r["step"], r["train/loss"]) for r in map(json.loads, f) if "train/loss" in r]


def launcher_env() -> dict[str, str]:
    """The test environment *with* the suite's 8-device XLA_FLAGS: the launcher must replace the count."""
    return {**subprocess_env(), "XLA_FLAGS": os.environ["XLA_FLAGS"]}


# ---- multi-process equivalence ---------------------------------------------------------------------------


def test_two_processes_train_like_one(tmp_path):
    """2 processes x 2 devices log the per-step train/loss of 1 process x 4 devices, on two meshes.

    The devices are laid out process by process in (data, fsdp, tensor) order, so the process boundary splits
    the outermost mesh axis larger than 1. Two meshes put every kind of parallelism across it:
    - fsdp_tensor (fsdp=2 x tensor=2), the boundary on fsdp: each process loads its own half of the batch (rows
      split over data x fsdp, as in a data-parallel run); the parameters are initialised on shards held by both
      processes, all-gathered between them and their gradients reduce-scattered; replicated parameters (the
      norm scales) get their gradients all-reduced between the processes as under data parallelism; tensor
      parallelism runs inside each process.
    - tensor (tensor=4), the boundary on tensor: every process loads the whole (replicated) batch and the
      tensor-parallel collectives run between the processes.
    A data-only mesh would add no path of its own (split batch rows and gradient all-reduces between processes
    are in fsdp_tensor); its numerics are test_sharding's data8 step and 2-process data=2 runs are
    test_two_process_grain_run_resumes_each_shard_exactly's. The one reference is the single process on the
    fsdp_tensor mesh: another mesh only reorders float sums, well inside the tolerance.
    """
    # the step-indexed windows sampler gives every process count the same global batches; 4 heads fit tensor=4
    args = [*QUICK[1:], "--config.data.pipeline=windows", "--config.train.steps=6", "--config.train.batch_size=8",
            "--config.model.num_heads=4"]

    def run(mesh: str, num_processes: int, devices: int) -> list[tuple[int, float]]:
        name = f"{mesh}_{num_processes}x{devices}"
        workdir, logs = tmp_path / name, tmp_path / f"logs_{name}"
        status = local.launch([f"--config=experiments/python_docs.py:quick,mesh={mesh}", *args, f"--workdir={workdir}"],
                              num_processes, devices, env=launcher_env(), cwd=str(REPO_ROOT), log_dir=str(logs),
                              timeouts=processes.Timeouts(total=300))
        assert status == 0, (logs / "process_0.log").read_text()[-3000:]
        return train_losses(workdir)

    with concurrent.futures.ThreadPoolExecutor(3) as pool:  # 5 processes: both cores stay busy while compiling
        futures = {"one process": pool.submit(run, "fsdp_tensor", 1, 4),
                   **{mesh: pool.submit(run, mesh, 2, 2) for mesh in MESHES}}
        losses = {name: future.result() for name, future in futures.items()}
    one = losses.pop("one process")
    assert [step for step, _ in one] == [1, 2, 3, 4, 5, 6]
    for mesh, two in losses.items():
        assert [step for step, _ in two] == [1, 2, 3, 4, 5, 6], f"{mesh}: process 0 alone writes"
        for (step, expected), (_, actual) in zip(one, two):
            assert actual == pytest.approx(expected, rel=1e-5), f"{mesh}, step {step}: {one} vs {two}"


def test_two_process_grain_run_resumes_each_shard_exactly(tmp_path):
    """Stopped at step 6 and resumed, a 2-process run on the Grain pipeline (each process its own document
    shard and iterator state) logs the losses of an uninterrupted run. decay_steps is fixed, so the two
    schedules agree although the first leg asks for 6 steps. One process then evaluates and samples the run
    (its checkpoint holds two processes' iterator states, which neither command needs)."""
    args = [*QUICK, "--config.mesh.data=2", "--config.optimizer.decay_steps=12", "--config.train.checkpoint_every=6"]

    def run(workdir, steps: int) -> None:
        logs = tmp_path / f"logs_{workdir.name}_{steps}"
        status = local.launch([*args, f"--config.train.steps={steps}", f"--workdir={workdir}"], 2, 1,
                              env=launcher_env(), cwd=str(REPO_ROOT), log_dir=str(logs),
                              timeouts=processes.Timeouts(total=240))
        assert status == 0, (logs / "process_0.log").read_text()[-3000:]

    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # side by side: each mostly starts up and compiles
        for future in [pool.submit(run, tmp_path / "uninterrupted", 12), pool.submit(run, tmp_path / "resumed", 6)]:
            future.result()
    run(tmp_path / "resumed", 12)
    expected, resumed = train_losses(tmp_path / "uninterrupted"), train_losses(tmp_path / "resumed")
    assert [step for step, _ in resumed] == list(range(1, 13))
    assert resumed == expected

    workdir = tmp_path / "resumed"
    commands = {"evaluate": [f"--workdir={workdir}"], "generate": [f"--workdir={workdir}", "--max_new_tokens=5"]}
    started = {name: subprocess.Popen([sys.executable, "-m", f"llm_jax.{name}", *flags], cwd=REPO_ROOT,
                                      env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for name, flags in commands.items()}  # side by side: each mostly imports and compiles
    try:
        outputs = {name: process.communicate(timeout=240) for name, process in started.items()}
    finally:
        for process in started.values():
            if process.poll() is None:
                process.kill()
    for name, process in started.items():
        assert process.returncode == 0, f"{name}: {outputs[name][1][-3000:]}"
    assert json.loads(outputs["evaluate"][0].strip().splitlines()[-1])["step"] == 12
    assert outputs["generate"][0].strip(), "generate printed no continuation"


# ---- failures ----------------------------------------------------------------------------------------------


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.2)


def _logged_a_step(workdir) -> bool:
    path = workdir / "metrics.jsonl"
    return path.exists() and '"train/loss"' in path.read_text()


def _pids(log_dir) -> list[int]:
    """The processes' pids from the launcher's pid files (written as soon as all have started)."""
    return [int(path.read_text()) for path in sorted(log_dir.glob("process_*.pid"))]


def _kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_killed_peer_ends_the_job_and_names_the_process(tmp_path):
    workdir, logs, stderr_path = tmp_path / "run", tmp_path / "logs", tmp_path / "launcher.err"
    command = [sys.executable, "-m", "launch.local", "--num_processes=2", "--devices_per_process=1",
               f"--log_dir={logs}", "--grace_period=5", "--timeout=300", "--", *QUICK, "--config.train.steps=100000",
               "--config.mesh.data=2", f"--workdir={workdir}"]
    with open(stderr_path, "w") as stderr:
        launcher = subprocess.Popen(command, cwd=REPO_ROOT, env=launcher_env(), stdout=subprocess.DEVNULL,
                                    stderr=stderr)
    try:
        # process 0 logs step 1 only after both processes ran it (the step is collective)
        _wait_for(lambda: _logged_a_step(workdir) or launcher.poll() is not None, 150, "step 1 in metrics.jsonl")
        assert launcher.poll() is None, stderr_path.read_text()[-3000:]
        pids = _pids(logs)
        os.kill(pids[1], signal.SIGKILL)
        killed_at = time.monotonic()
        status = launcher.wait(timeout=60)
        elapsed = time.monotonic() - killed_at
    finally:  # whatever happened, leave no training process behind
        for pid in _pids(logs):
            _kill_quietly(pid)
        _kill_quietly(launcher.pid)
        launcher.wait(timeout=10)
    message = stderr_path.read_text()
    assert status == 128 + signal.SIGKILL, message[-3000:]
    assert "process 1 (pid %d) was killed by signal 9 (SIGKILL)" % pids[1] in message
    assert elapsed < 60
    with pytest.raises(ProcessLookupError):
        os.kill(pids[0], 0)  # the surviving process was stopped (and reaped) too


def test_unreachable_coordinator_fails_instead_of_hanging(tmp_path):
    closed_port = processes.free_port()
    command = [sys.executable, "-m", "llm_jax.train", *QUICK, f"--workdir={tmp_path}",
               f"--coordinator_address=127.0.0.1:{closed_port}", "--num_processes=2", "--process_id=1",
               "--distributed_timeout=5"]
    result = subprocess.run(command, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, "a one-line error, not an abort"
    assert f"cannot reach the coordinator at --coordinator_address=127.0.0.1:{closed_port} within 5s" in result.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


def _listening_addresses(port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Local addresses of the TCP sockets listening on `port` (Linux /proc/net/tcp*; IPv4-mapped ones as IPv4)."""
    found = []
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(path):  # tcp6 is absent where IPv6 is disabled
            continue
        with open(path) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                hex_host, hex_port = fields[1].split(":")
                if fields[3] != "0A" or int(hex_port, 16) != port:  # 0A = LISTEN
                    continue
                raw = bytes.fromhex(hex_host)  # 32-bit words in host byte order
                if sys.byteorder == "little":
                    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                address = ipaddress.ip_address(raw)
                found.append(getattr(address, "ipv4_mapped", None) or address)
    return found


def test_local_coordinator_listens_on_loopback_only(tmp_path):
    """Process 0's unauthenticated coordinator is bound to loopback, not to JAX's default [::]:PORT (every
    interface): no other machine can join or disturb a local job."""
    needs(os.path.exists("/proc/net/tcp"), "the listening sockets are read from Linux's /proc/net/tcp")
    port, logs, stderr_path = processes.free_port(), tmp_path / "logs", tmp_path / "launcher.err"
    command = [sys.executable, "-m", "launch.local", "--num_processes=2", f"--port={port}", f"--log_dir={logs}",
               "--timeout=60", "--", *QUICK, "--config.train.steps=100000", "--config.mesh.data=2",
               f"--workdir={tmp_path / 'run'}"]
    with open(stderr_path, "w") as stderr:
        launcher = subprocess.Popen(command, cwd=REPO_ROOT, env=launcher_env(), stdout=subprocess.DEVNULL,
                                    stderr=stderr)
    try:  # process 0 listens once it reaches jax.distributed.initialize, before any compilation
        _wait_for(lambda: _listening_addresses(port) or launcher.poll() is not None, 60, f"a listener on {port}")
        addresses = _listening_addresses(port)
    finally:
        for pid in _pids(logs):
            _kill_quietly(pid)
        _kill_quietly(launcher.pid)
        launcher.wait(timeout=10)
    assert addresses, stderr_path.read_text()[-3000:]
    assert all(address.is_loopback for address in addresses), f"coordinator listens on {addresses}"


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_group_stops_everyone_when_one_fails_and_shows_its_output(tmp_path, capsys):
    # Process 1 fails only once process 0 has printed, so the group sees both outputs on any machine.
    ready = tmp_path / "zero_printed"
    commands = [_python(f"import pathlib, time; print('zero up', flush=True); "
                        f"pathlib.Path({str(ready)!r}).touch(); time.sleep(60)"),
                _python(f"import pathlib, sys, time\n"
                        f"while not pathlib.Path({str(ready)!r}).exists(): time.sleep(0.01)\n"
                        f"print('one says goodbye', flush=True); sys.exit(3)")]
    start = time.monotonic()
    status = processes.run_group(commands, [subprocess_env()] * 2, local.make_sinks(2, None),
                                 timeouts=processes.Timeouts(grace=5, total=60))
    err = capsys.readouterr().err
    assert status == 3 and time.monotonic() - start < 30
    assert "process 1 (pid" in err and "exited with status 3" in err
    assert "[process 1] one says goodbye" in err and "zero up\n" in err
    assert "last 1 lines of process 1:\none says goodbye" in err


def test_sigterm_to_the_launcher_is_forwarded_to_every_process(tmp_path):
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers (and so forwarding) need the main thread")
    code = ("import signal, sys, time, pathlib\n"
            "def stop(signum, frame):\n"
            f"    pathlib.Path(r'{tmp_path}', sys.argv[1]).write_text(str(signum)); sys.exit(128 + signum)\n"
            "signal.signal(signal.SIGTERM, stop)\n"
            "print('ready', flush=True)\n"
            "time.sleep(60)\n")
    commands = [[*_python(code), f"got_{i}"] for i in range(2)]
    timer = threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        status = processes.run_group(commands, [subprocess_env()] * 2, local.make_sinks(2, str(tmp_path)),
                                     timeouts=processes.Timeouts(grace=5, stop=20, total=60))
    finally:
        timer.cancel()
    assert status == 128 + signal.SIGTERM
    assert [(tmp_path / f"got_{i}").read_text() for i in range(2)] == [str(int(signal.SIGTERM))] * 2
    assert (tmp_path / "process_1.log").read_text() == "ready\n"


def test_device_count_flag_is_replaced_not_duplicated():
    env = local.process_env({"XLA_FLAGS": "--xla_foo=1 --xla_force_host_platform_device_count=8"}, 2)
    assert env["XLA_FLAGS"] == "--xla_foo=1 --xla_force_host_platform_device_count=2"
    assert env["JAX_PLATFORMS"] == "cpu"
    assert local.process_env({}, 3)["XLA_FLAGS"] == "--xla_force_host_platform_device_count=3"


@pytest.mark.parametrize("args, message", [
    ([], "no llm_jax.train arguments"),
    (["--config=x", "--process_id=1"], "--process_id is set by the launcher"),
])
def test_launch_rejects_bad_train_args(args, message):
    with pytest.raises(ValueError, match=message):
        local.launch(args, 2, 1)
    result = subprocess.run([sys.executable, "-m", "launch.local", "--num_processes=2", "--", *args], cwd=REPO_ROOT,
                            env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and message in result.stderr


# ---- TPU and SLURM commands --------------------------------------------------------------------------------

TRAIN_ARGS = ["--config=experiments/python_docs.py", "--workdir=/shared/runs/a b", SPACED_ARG]


def test_tpu_commands_run_on_all_workers_with_quoted_args():
    setup, run = tpu.tpu_commands("my-tpu", "us-central2-b", TRAIN_ARGS, repo_url="https://example.com/llm_jax.git",
                                  project="proj", branch="dev")
    for command in (setup, run):
        assert command[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
        assert "--zone=us-central2-b" in command and "--project=proj" in command and "--worker=all" in command
    setup_shell = setup[-1].removeprefix("--command=")
    assert "git clone --branch dev https://example.com/llm_jax.git llm_jax;" in setup_shell
    assert "git -C llm_jax merge --ff-only FETCH_HEAD" in setup_shell, "an existing checkout is updated"
    assert shlex.split(setup_shell)[-8:] == ["python3", "-m", "pip", "install", "-q", "-e", ".", "jax[tpu]"]
    run_shell = shlex.split(run[-1].removeprefix("--command="))
    assert run_shell[:3] == ["cd", "llm_jax", "&&"]
    assert run_shell[-len(TRAIN_ARGS) - 4:] == ["python3", "-m", "llm_jax.train", "--jax_distributed", *TRAIN_ARGS]
    assert "--project=proj" not in tpu.tpu_commands("t", "z", TRAIN_ARGS, repo_url="u")[0]


def test_tpu_cli_prints_the_commands():
    result = subprocess.run([sys.executable, "-m", "launch.tpu", "--tpu_name=my-tpu", "--zone=us-central2-b",
                             "--repo_url=https://example.com/llm_jax.git", "--", *TRAIN_ARGS], cwd=REPO_ROOT,
                            env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    printed = [shlex.split(line) for line in result.stdout.splitlines()]
    assert printed == tpu.tpu_commands("my-tpu", "us-central2-b", TRAIN_ARGS,
                                       repo_url="https://example.com/llm_jax.git")
    missing = subprocess.run([sys.executable, "-m", "launch.tpu", "--tpu_name=t", "--", *TRAIN_ARGS], cwd=REPO_ROOT,
                             env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0 and "--zone" in missing.stderr


def test_sbatch_script_has_one_task_per_gpu_and_the_train_args():
    text = slurm.sbatch_script(TRAIN_ARGS, nodes=2, gpus_per_node=4, time="2-00:00:00", partition="gpu",
                               account="acct", job_name="sc", output="/logs/%x-%j.out")
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash"
    for directive in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--time=2-00:00:00",
                      "--partition=gpu", "--account=acct", "--job-name=sc", "--output=/logs/%x-%j.out"):
        assert f"#SBATCH {directive}" in lines
    [srun] = [line for line in lines if line.startswith("srun ")]
    assert shlex.split(srun)[-len(TRAIN_ARGS) - 3:] == ["python", "-m", "llm_jax.train", *TRAIN_ARGS]
    assert "--kill-on-bad-exit=1" in srun and f"cd {shlex.quote(str(REPO_ROOT))}" in lines
    assert not any("--partition" in line for line in slurm.sbatch_script(TRAIN_ARGS, 1, 1).splitlines())
    with pytest.raises(ValueError, match="HH:MM:SS"):
        slurm.sbatch_script(TRAIN_ARGS, 1, 1, time="5h")
    with pytest.raises(ValueError, match="whitespace"):
        slurm.sbatch_script(TRAIN_ARGS, 1, 1, job_name="my job")


def test_generated_shell_passes_the_train_args_through_unchanged(tmp_path):
    """The remote TPU command and the sbatch script, run by a real shell, hand python exactly TRAIN_ARGS."""
    fake_python, fake_srun = tmp_path / "python", tmp_path / "srun"
    fake_python.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    fake_srun.write_text('#!/bin/sh\nshift\nexec "$@"\n')  # drops --kill-on-bad-exit=1, runs the rest
    for path in (fake_python, fake_srun):
        path.chmod(0o755)
    env = {**subprocess_env(), "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "1",
           "SLURM_NTASKS": "1", "SLURM_JOB_NODELIST": "node1"}
    for shell_text, expected in (
            (tpu.run_script(TRAIN_ARGS, str(tmp_path), python=str(fake_python)), ["--jax_distributed", *TRAIN_ARGS]),
            (slurm.sbatch_script(TRAIN_ARGS, 1, 1, python=str(fake_python)), TRAIN_ARGS)):
        result = subprocess.run(["bash", "-c", shell_text], env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout.splitlines()[-1]) == ["-m", "llm_jax.train", *expected]


def test_slurm_cli_writes_prints_and_refuses_to_submit_without_sbatch(tmp_path):
    script = tmp_path / "jobs" / "sc.sbatch"
    base = [sys.executable, "-m", "launch.slurm", "--nodes=2", "--gpus_per_node=8", "--job_name=sc",
            f"--script={script}"]
    result = subprocess.run([*base, "--", *TRAIN_ARGS], cwd=REPO_ROOT, env=subprocess_env(), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    path, text = result.stdout.split("\n", 1)
    assert path == str(script) and text == script.read_text()
    assert f"#SBATCH --output={tmp_path / 'jobs'}/%x-%j.out" in text and "#SBATCH --ntasks-per-node=8" in text
    if shutil.which("sbatch") is None:
        submitted = subprocess.run([*base, "--submit", "--", *TRAIN_ARGS], cwd=REPO_ROOT, env=subprocess_env(),
                                   capture_output=True, text=True, timeout=60)
        assert submitted.returncode != 0 and "sbatch is not installed" in submitted.stderr


def test_sigterm_to_one_process_checkpoints_every_process_at_the_same_step(tmp_path):
    """A SIGTERM to process 1 alone (a preemption notice) reaches process 0 through JAX's preemption sync point,
    so both save the same step and exit 143; the job then resumes only with the same process count."""
    workdir, logs, stderr_path = tmp_path / "run", tmp_path / "logs", tmp_path / "launcher.err"
    train_args = [*QUICK, "--config.train.steps=100000", "--config.mesh.data=2", f"--workdir={workdir}"]
    command = [sys.executable, "-m", "launch.local", "--num_processes=2", "--devices_per_process=1",
               f"--log_dir={logs}", "--grace_period=30", "--timeout=300", "--", *train_args]
    with open(stderr_path, "w") as stderr:
        launcher = subprocess.Popen(command, cwd=REPO_ROOT, env=launcher_env(), stdout=subprocess.DEVNULL,
                                    stderr=stderr)
    try:
        _wait_for(lambda: _logged_a_step(workdir) or launcher.poll() is not None, 150, "step 1 in metrics.jsonl")
        os.kill(_pids(logs)[1], signal.SIGTERM)
        status = launcher.wait(timeout=90)
    finally:
        for pid in _pids(logs):
            _kill_quietly(pid)
        _kill_quietly(launcher.pid)
        launcher.wait(timeout=10)
    assert status == 128 + signal.SIGTERM, stderr_path.read_text()[-3000:]
    saved = [int(name) for name in os.listdir(workdir / "checkpoints")]
    assert len(saved) == 1
    outputs = [stderr_path.read_text(), (logs / "process_1.log").read_text()]
    for output in outputs:
        assert f"checkpointed step {saved[0]}, stopping" in output, output[-2000:]
    # each process read its own shard of the documents and saved its own Grain iterator position
    data_dir = workdir / "checkpoints" / str(saved[0]) / "data"
    states = [json.loads((data_dir / f"process_{i}-of-2.json").read_text()) for i in range(2)]
    assert "grain" in states[0] and states[0] != states[1]
    two_devices = {**subprocess_env(), "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    one_process = subprocess.run([sys.executable, "-m", "llm_jax.train", *train_args], cwd=REPO_ROOT,
                                 env=two_devices, capture_output=True, text=True, timeout=300)
    assert one_process.returncode != 0
    assert "data-iterator states of 2 processes" in one_process.stderr, one_process.stderr[-3000:]
    assert "Traceback" not in one_process.stderr
