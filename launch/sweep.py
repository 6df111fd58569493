"""Runs an experiment's `get_sweep()`: one `llm_jax.train` run per override dict, locally or as TPU/SLURM commands.

    python -m launch.sweep --config=experiments/shakespeare_char.py:quick --sweep_dir=runs/sweep
    python -m launch.sweep --config=... --sweep_dir=... --parallel=2 -- --config.train.steps=200
    python -m launch.sweep --config=... --sweep_dir=... --backend=slurm --slurm_gpus_per_node=8
    python -m launch.sweep --config=... --sweep_dir=... --only=learning_rate=0.001 --dry_run   # a subset
    python -m launch.report --sweep_dir=runs/sweep        # table, CSV and loss curves

Every run's config is built and validated before anything starts. Runs live in SWEEP_DIR/NAME, where NAME is
made from the run's overrides (`learning_rate=0.001,d_model=64`); SWEEP_DIR/sweep.json lists them. The local
backend skips finished runs (final eval logged), so re-running an interrupted sweep finishes only what is left
(unfinished runs resume from their checkpoints). The tpu and slurm backends print the commands (slurm: writes
SWEEP_DIR/NAME/job.sbatch) instead of running anything.
"""

from __future__ import annotations

import ast
import dataclasses
import datetime
import importlib.util
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Mapping, Sequence

import ml_collections
from absl import app, flags

from llm_jax import config as config_lib
from llm_jax import workdir_lock
from llm_jax.errors import UserError, WorkdirError
from llm_jax.training import run_record
from llm_jax.training.metrics import read_run_metrics

SWEEP_FILE = "sweep.json"
RUN_FILE = "sweep_run.json"
LOG_FILE = "train.log"
BACKENDS = ("local", "tpu", "slurm")
_MAX_NAME = 120
_TERMINATE_GRACE_S = 120.0  # a SIGTERMed train checkpoints first; after this it is killed


class SweepError(UserError, ValueError):
    """A sweep that cannot run; the message names the file, run or key to fix."""


@dataclasses.dataclass
class Run:
    """One run of a sweep: its name, its overrides, its work directory and planned train.steps."""

    name: str
    overrides: dict[str, Any]
    workdir: str = ""
    steps: int | None = None


@dataclasses.dataclass(frozen=True)
class RemoteOptions:
    """Settings of the tpu and slurm backends."""

    tpu_name: str = "TPU_NAME"
    zone: str = "ZONE"
    repo_dir: str = ""  # "" = llm_jax (in $HOME) on TPU VMs, this directory for slurm (a shared file system)
    slurm_nodes: int = 1
    slurm_gpus_per_node: int = 0
    slurm_time: str = ""
    slurm_partition: str = ""


# ----------------------------------------------------------------------------- expanding and validating


def split_config_arg(config_arg: str) -> tuple[str, str | None]:
    """'experiments/x.py:variant' -> ('experiments/x.py', 'variant'), split like ml_collections does."""
    path, sep, variant = config_arg.partition(":")
    return path, (variant if sep else None)


def load_experiment(path: str) -> Any:
    """Imports the experiment file at `path` as a module."""
    if not os.path.isfile(path):
        raise SweepError(f"experiment file {path} does not exist; pass --config=experiments/NAME.py[:variant]")
    spec = importlib.util.spec_from_file_location(f"sweep_experiment_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as error:  # noqa: BLE001 - any failure of user code is reported with its file
        raise SweepError(f"cannot import experiment file {path}: {type(error).__name__}: {error}") from None
    return module


def _sweep_dicts(module: Any, path: str) -> list[dict[str, Any]]:
    """`get_sweep()` of the experiment, checked to be a non-empty list of {dotted key: value} dicts."""
    if not hasattr(module, "get_sweep"):
        raise SweepError(f"{path} defines no get_sweep(); add `def get_sweep() -> list[dict]` returning "
                         "override dicts such as [{'optimizer.learning_rate': 1e-3}, ...]")
    try:
        sweep = module.get_sweep()
    except Exception as error:  # noqa: BLE001 - any failure of user code is reported with its file
        raise SweepError(f"get_sweep() of {path} failed: {type(error).__name__}: {error}") from None
    if not isinstance(sweep, (list, tuple)) or not sweep:
        raise SweepError(f"get_sweep() of {path} returned {sweep!r}; it must return a non-empty list of dicts")
    for index, entry in enumerate(sweep):
        if not isinstance(entry, Mapping) or not all(isinstance(key, str) for key in entry):
            raise SweepError(f"get_sweep() of {path}: entry {index} is {entry!r}, not a dict of 'section.key' strings")
    return [dict(entry) for entry in sweep]


def format_value(value: Any) -> str:
    """A value as written on the command line (`--config.k=VALUE`) and in run names."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return repr(tuple(value))
    return str(value)


def short_keys(sweep: list[dict[str, Any]]) -> dict[str, str]:
    """Dotted key -> the name it gets in run names: the last part, unless two keys share it."""
    keys = list(dict.fromkeys(key for overrides in sweep for key in overrides))
    last = [key.rpartition(".")[2] for key in keys]
    return {key: short if last.count(short) == 1 else key for key, short in zip(keys, last)}


def run_names(sweep: list[dict[str, Any]]) -> list[str]:
    """Readable, filesystem-safe, unique names: `learning_rate=0.001,d_model=64` (empty overrides: `base`)."""
    short = short_keys(sweep)
    names, seen = [], set()
    for overrides in sweep:
        name = ",".join(f"{short[key]}={format_value(value)}" for key, value in overrides.items()) or "base"
        name = re.sub(r"[^A-Za-z0-9._=,+-]", "_", name)[:_MAX_NAME].lstrip(".") or "run"
        unique, count = name, 1
        while unique in seen:
            count += 1
            unique = f"{name}-{count}"
        seen.add(unique)
        names.append(unique)
    return names


def parse_extra_args(extra_args: Sequence[str]) -> list[tuple[str, str]]:
    """The `--config.section.key=value` pairs of the extra train arguments (others pass through unchecked)."""
    pairs = []
    for arg in extra_args:
        if not arg.startswith("--"):
            raise SweepError(f"extra train argument {arg!r} is not a --flag=value; write e.g. --config.train.steps=20")
        flag, _, value = arg[2:].partition("=")
        if flag in ("config", "workdir"):
            raise SweepError(f"extra train argument {arg!r}: the sweep sets --{flag} itself; remove it")
        if flag.startswith("config."):
            if "=" not in arg:
                raise SweepError(f"extra train argument {arg!r} has no value; write --{flag}=VALUE")
            pairs.append((flag[len("config."):], value))
    return pairs


def _parse_like(dotted: str, text: str, current: Any) -> Any:
    """Parses a command-line value with the type of the config field it sets (as config_flags does)."""
    section, _, name = dotted.partition(".")
    key = config_lib.SCHEMA.get(section, {}).get(name)
    kind = type(current) if current is not None else (key.type if key else None)
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0"):
            raise SweepError(f"extra train argument --config.{dotted}={text}: expected true or false")
        return text.lower() in ("true", "1")
    if kind in (int, float, str):
        try:
            return kind(text)
        except ValueError:
            expected = {int: "an integer", float: "a number", str: "a string"}[kind]
            raise SweepError(f"extra train argument --config.{dotted}={text}: expected {expected}") from None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _apply(config: Any, dotted: str, value: Any, where: str) -> None:
    """Sets one dotted key, turning every failure into a SweepError that names `where` and the key."""
    try:
        config_lib.override(config, [(dotted, value)])
    except (config_lib.ConfigError, TypeError, ValueError, KeyError, AttributeError) as error:
        raise SweepError(f"{where}: cannot set {dotted}={value!r}: {error}") from None


def _mesh_device_guess(config: Any) -> int:
    """The device count a config's mesh asks for, with a -1 axis counted as 1 (for remote backends)."""
    return math.prod(max(1, int(config.mesh[axis])) for axis in config_lib.MESH_AXES)


def build_run_config(module: Any, variant: str | None, overrides: Mapping[str, Any],
                     extra_pairs: Sequence[tuple[str, str]], where: str) -> Any:
    """The run's config: get_config(variant), the extra --config args, then the run's overrides."""
    try:
        config = module.get_config(variant) if variant is not None else module.get_config()
    except Exception as error:  # noqa: BLE001 - any failure of user code is reported with its file
        raise SweepError(f"{where}: get_config({variant!r}) failed: {type(error).__name__}: {error}") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise SweepError(f"{where}: get_config({variant!r}) returned {type(config).__name__}, not a ConfigDict; "
                         "start from llm_jax.config.default_config() and return it")
    for dotted, text in extra_pairs:
        section, _, name = dotted.partition(".")
        if section not in config_lib.SCHEMA or name not in config_lib.SCHEMA[section]:
            raise SweepError(f"extra train argument --config.{dotted}: unknown config key {dotted}; see docs/config.md")
        _apply(config, dotted, _parse_like(dotted, text, config[section][name]), "extra train arguments")
    for dotted, value in overrides.items():
        _apply(config, dotted, value, where)
    return config


def _validate(config: Any, num_devices: int | None, where: str) -> None:
    devices = num_devices or _mesh_device_guess(config)
    try:
        config_lib.validate(config, devices)
    except config_lib.ConfigError as error:
        raise SweepError(f"{where}: {error} (checked for {devices} device(s) per run; --num_devices sets "
                         "another count)") from None


def expand_sweep(config_arg: str, sweep_dir: str = "", extra_args: Sequence[str] = (),
                 num_devices: int | None = 1) -> list[Run]:
    """Expands and validates the sweep of `config_arg` (experiment[:variant]); raises SweepError on any bad run.

    `num_devices` is the device count each run is validated for (None: what the config's mesh asks for).
    """
    path, variant = split_config_arg(config_arg)
    module = load_experiment(path)
    sweep = _sweep_dicts(module, path)
    extra_pairs = parse_extra_args(extra_args)
    runs = []
    for name, overrides in zip(run_names(sweep), sweep):
        clash = sorted(set(overrides) & {dotted for dotted, _ in extra_pairs})
        if clash:
            raise SweepError(f"run {name}: {', '.join(clash)} is both swept and set by an extra train argument; "
                             "remove one of them")
        where = f"run {name} of {path}"
        config = build_run_config(module, variant, overrides, extra_pairs, where)
        _validate(config, num_devices, where)
        runs.append(Run(name, overrides, os.path.join(sweep_dir, name) if sweep_dir else "", int(config.train.steps)))
    return runs


# ----------------------------------------------------------------------------- state on disk


def _read_json(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_metrics(workdir: str) -> list[dict]:
    """The records of DIR/metrics.jsonl ([] if missing; a torn last line is ignored); a corrupt line is a
    SweepError naming the file and line, so the sweep stops with one line instead of a traceback."""
    try:
        return read_run_metrics(workdir)
    except ValueError as error:
        raise SweepError(str(error)) from None


def is_finished(workdir: str, planned_steps: int | None = None) -> bool:
    """Whether the run in `workdir` logged its final eval (eval/loss at step == train.steps of its config.json).

    With `planned_steps`, a run whose config.json has a different train.steps is not finished (it will resume).
    """
    try:  # the config in force: a resume may have changed train.steps
        steps = int(run_record.config_in_force(run_record.read_record(workdir) or {})["train"]["steps"])
    except (UserError, TypeError, KeyError, ValueError):
        return False
    if planned_steps is not None and steps != planned_steps:
        return False
    return any("eval/loss" in record and record["step"] == steps and "source" not in record
               for record in read_metrics(workdir))


def _json_ready(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def sweep_record(config_arg: str, backend: str, extra_args: Sequence[str], runs: Sequence[Run]) -> dict:
    """The content of SWEEP_DIR/sweep.json."""
    path, variant = split_config_arg(config_arg)
    return {"config": config_arg, "experiment": path, "variant": variant, "backend": backend,
            "extra_args": list(extra_args),
            "runs": [{"name": run.name, "overrides": {k: _json_ready(v) for k, v in run.overrides.items()},
                      "workdir": run.workdir} for run in runs]}


def write_sweep_file(sweep_dir: str, record: dict) -> None:
    """Writes SWEEP_DIR/sweep.json, warning when it replaces a sweep with other settings."""
    path = os.path.join(sweep_dir, SWEEP_FILE)
    old = _read_json(path)
    if old and any(old.get(key) != record[key] for key in ("experiment", "variant", "extra_args")):
        print(f"warning: {path} described another sweep ({old.get('config')} {old.get('extra_args')}); "
              "replacing it", flush=True)
    os.makedirs(sweep_dir, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2, default=str)
        f.write("\n")


# ----------------------------------------------------------------------------- commands


def train_args(config_arg: str, run: Run, extra_args: Sequence[str]) -> list[str]:
    """The `llm_jax.train` arguments of one run: extra args first, the run's overrides last."""
    overrides = [f"--config.{key}={format_value(value)}" for key, value in run.overrides.items()]
    return [f"--config={config_arg}", f"--workdir={run.workdir}", *extra_args, *overrides]


def _remote_path(path: str) -> str:
    """Shell-quotes a path but keeps a leading ~/ expandable."""
    if path == "~" or path.startswith("~/"):
        rest = path[2:]
        return "~/" + (shlex.quote(rest) if rest else "")
    return shlex.quote(path)


def tpu_command(config_arg: str, run: Run, extra_args: Sequence[str], options: RemoteOptions) -> str:
    """One `gcloud compute tpus tpu-vm ssh ... --worker=all --command='cd REPO && python -m llm_jax.train ...'`."""
    train = shlex.join(["python3", "-m", "llm_jax.train", *train_args(config_arg, run, extra_args)])
    inner = f"cd {_remote_path(options.repo_dir or 'llm_jax')} && PYTHONUNBUFFERED=1 {train}"
    return shlex.join(["gcloud", "compute", "tpus", "tpu-vm", "ssh", options.tpu_name, f"--zone={options.zone}",
                       "--worker=all"]) + " --command=" + shlex.quote(inner)


def sbatch_script(config_arg: str, run: Run, extra_args: Sequence[str], options: RemoteOptions,
                  sweep_name: str) -> str:
    """A SLURM batch script that runs one sweep run with `srun`: one task per GPU (per node without GPUs).

    llm_jax.train starts jax.distributed from the SLURM environment when there is more than one task.
    """
    gpus = options.slurm_gpus_per_node
    lines = ["#!/bin/bash", f"#SBATCH --job-name={sweep_name}-{run.name}"[:200],
             f"#SBATCH --output={os.path.join(run.workdir, 'slurm-%j.out')}",
             f"#SBATCH --nodes={options.slurm_nodes}", f"#SBATCH --ntasks-per-node={gpus or 1}"]
    if gpus:
        lines.append(f"#SBATCH --gpus-per-node={gpus}")
    if options.slurm_time:
        lines.append(f"#SBATCH --time={options.slurm_time}")
    if options.slurm_partition:
        lines.append(f"#SBATCH --partition={options.slurm_partition}")
    train = shlex.join(["srun", "--kill-on-bad-exit=1", "python", "-m", "llm_jax.train",
                        *train_args(config_arg, run, extra_args)])
    repo_dir = _remote_path(options.repo_dir or os.getcwd())
    return "\n".join([*lines, "", "set -euo pipefail", f"cd {repo_dir}", "export PYTHONUNBUFFERED=1", train, ""])


def _print_tpu(config_arg: str, runs: Sequence[Run], extra_args: Sequence[str], options: RemoteOptions) -> None:
    print(f"# {len(runs)} runs; with the workers set up (python -m launch.tpu prints the setup command), run these "
          f"one after another (each uses every worker of {options.tpu_name}):")
    for run in runs:
        print(tpu_command(config_arg, run, extra_args, options))


def _write_slurm(config_arg: str, runs: Sequence[Run], extra_args: Sequence[str], options: RemoteOptions,
                 sweep_dir: str) -> None:
    sweep_name = os.path.basename(os.path.normpath(sweep_dir)) or "sweep"
    print(f"# {len(runs)} job scripts written; submit them with:")
    for run in runs:
        os.makedirs(run.workdir, exist_ok=True)
        script = os.path.join(run.workdir, "job.sbatch")
        with open(script, "w", encoding="utf-8") as f:
            f.write(sbatch_script(config_arg, run, extra_args, options, sweep_name))
        print(shlex.join(["sbatch", script]))


# ----------------------------------------------------------------------------- local runs


def slot_devices(slot: int, devices_per_run: int) -> str:
    """CUDA_VISIBLE_DEVICES of a parallel slot: slot 1 with 2 devices per run -> '2,3'."""
    return ",".join(str(slot * devices_per_run + index) for index in range(devices_per_run))


@dataclasses.dataclass
class _Active:
    run: Run
    process: subprocess.Popen
    log: Any
    slot: int
    started: float
    command: list[str]
    devices: str | None
    terminated_at: float | None = None
    status: str | None = None


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _start(run: Run, command: list[str], slot: int, devices_per_run: int, env: Mapping[str, str] | None) -> _Active:
    os.makedirs(run.workdir, exist_ok=True)
    child_env = dict(os.environ if env is None else env)
    devices = slot_devices(slot, devices_per_run) if devices_per_run else None
    if devices is not None:
        child_env["CUDA_VISIBLE_DEVICES"] = devices
    log = open(os.path.join(run.workdir, LOG_FILE), "a", encoding="utf-8")
    log.write(f"# {_now()} launch.sweep: {shlex.join(command)}\n")
    log.flush()
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=child_env)
    where = f" on CUDA_VISIBLE_DEVICES={devices}" if devices is not None else ""
    print(f"start {run.name}{where} (log: {log.name})", flush=True)
    return _Active(run, process, log, slot, time.time(), command, devices)


def _log_tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def _finish(active: _Active, returncode: int) -> str:
    """Writes DIR/NAME/sweep_run.json for a finished process and prints its outcome; returns its status."""
    active.log.close()
    wall = time.time() - active.started
    status = active.status or ("ok" if returncode == 0 else "failed")
    if status == "ok" and not is_finished(active.run.workdir, active.run.steps):
        status = "unfinished"  # e.g. metrics.jsonl lost its final eval while the last checkpoint survived
        print(f"{active.run.name}: train exited 0 but {active.run.workdir}/metrics.jsonl has no eval/loss at step "
              f"{active.run.steps}; delete {active.run.workdir} to train it again", flush=True)
    path = os.path.join(active.run.workdir, RUN_FILE)
    previous = _read_json(path) or {}
    total = wall + (previous.get("total_wall_seconds", 0.0) if previous.get("status") != "ok" else 0.0)
    record = {"name": active.run.name, "overrides": {k: _json_ready(v) for k, v in active.run.overrides.items()},
              "status": status, "returncode": returncode, "wall_seconds": round(wall, 3),
              "total_wall_seconds": round(total, 3), "started": datetime.datetime.fromtimestamp(
                  active.started).astimezone().isoformat(timespec="seconds"), "finished": _now(),
              "command": active.command, "cuda_visible_devices": active.devices}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2, default=str)
        f.write("\n")
    print(f"{status} {active.run.name} (exit {returncode}, {wall:.1f}s)", flush=True)
    if status != "ok":
        print(f"--- last lines of {active.log.name}:\n{_log_tail(active.log.name)}---", flush=True)
    return status


class _StopRequest:
    """Records SIGTERM/SIGINT (main thread only) so the loop stops its runs cleanly instead of dying mid-write."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _stop_all(active: dict[int, _Active], reason: str) -> None:
    """SIGTERMs the train processes (they checkpoint and exit), waits, kills what outlives the grace period."""
    for item in active.values():
        item.status = reason
        if item.process.poll() is None:
            item.process.send_signal(signal.SIGTERM)
    deadline = time.time() + _TERMINATE_GRACE_S
    for item in list(active.values()):
        try:
            item.process.wait(timeout=max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            item.process.kill()
            item.process.wait()
        _finish(item, item.process.returncode)
    active.clear()


def _poll(active: dict[int, _Active], run_timeout: float, failed: list[str]) -> None:
    """Finishes the processes that exited; SIGTERMs (then kills) runs over `run_timeout` seconds."""
    for slot, item in list(active.items()):
        returncode = item.process.poll()
        if returncode is not None:
            if _finish(item, returncode) != "ok":
                failed.append(item.run.name)
            del active[slot]
        elif run_timeout and time.time() - item.started > run_timeout:
            if item.terminated_at is None:
                print(f"timeout {item.run.name}: over {run_timeout:.0f}s, sending SIGTERM", flush=True)
                item.status, item.terminated_at = "timeout", time.time()
                item.process.send_signal(signal.SIGTERM)
            elif time.time() - item.terminated_at > _TERMINATE_GRACE_S:
                item.process.kill()


def run_local(config_arg: str, runs: Sequence[Run], extra_args: Sequence[str], parallel: int = 1,
              devices_per_run: int = 0, env: Mapping[str, str] | None = None, run_timeout: float = 0.0) -> list[str]:
    """Runs `runs` with `python -m llm_jax.train`, `parallel` at a time; returns the names of failed runs."""
    path, variant = split_config_arg(config_arg)
    absolute_config = os.path.abspath(path) + (f":{variant}" if variant is not None else "")
    pending, active, failed = list(runs), {}, []
    stop = _StopRequest()
    try:
        while (pending or active) and stop.signum is None:
            for slot in range(parallel):
                if pending and slot not in active and stop.signum is None:
                    run = pending.pop(0)
                    command = [sys.executable, "-m", "llm_jax.train", *train_args(absolute_config, run, extra_args)]
                    active[slot] = _start(run, command, slot, devices_per_run, env)
            time.sleep(0.2)
            _poll(active, run_timeout, failed)
        if stop.signum is not None:
            print(f"signal {stop.signum}: stopping {len(active)} running train process(es) (they checkpoint); "
                  "re-run the sweep to resume", flush=True)
            _stop_all(active, "interrupted")
            raise SystemExit(128 + stop.signum)
    finally:
        stop.restore()
    return failed


# ----------------------------------------------------------------------------- the sweep


def _same_value(value: Any, text: str) -> bool:
    """Whether the command-line `text` names the swept `value` (numbers by value: 1e-3 names 0.001)."""
    if format_value(value).lower() == text.lower():
        return True
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return float(text) == float(value)
        except ValueError:
            return False
    return False


def _matches(run: Run, only: str, dotted_of: Mapping[str, str], config_arg: str) -> bool:
    """Whether `run` is named by the filter `only`: its exact name, or KEY=VALUE terms joined by commas that
    all hold for it (KEY dotted or as in run names)."""
    if only == run.name:
        return True
    for term in only.split(","):
        key, sep, value = (part.strip() for part in term.partition("="))
        if sep and key not in dotted_of:
            raise SweepError(f"--only={only}: {key} is not a swept key of {config_arg}; swept keys: "
                             f"{', '.join(sorted(set(dotted_of.values()))) or '(none)'}")
        if not sep or not _same_value(run.overrides.get(dotted_of[key], object()), value):
            return False
    return True


def select_runs(runs: Sequence[Run], only: Sequence[str], config_arg: str) -> list[Run]:
    """The runs that match any `--only` filter (all runs without one); a filter matching none is an error."""
    if not only:
        return list(runs)
    short = short_keys([run.overrides for run in runs])
    dotted_of = {**{name: dotted for dotted, name in short.items()}, **{dotted: dotted for dotted in short}}
    chosen = [[run for run in runs if _matches(run, text, dotted_of, config_arg)] for text in only]
    for text, matched in zip(only, chosen):
        if not matched:
            names = ", ".join(run.name for run in runs[:4]) + (", ..." if len(runs) > 4 else "")
            example = runs[0].name.split(",")[0]
            raise SweepError(f"--only={text} matches none of the {len(runs)} runs of {config_arg} ({names}); give "
                             f"KEY=VALUE terms joined by commas that all hold (e.g. --only={example}) or a run's "
                             "name; repeat --only for more runs")
    selected = {id(run) for matched in chosen for run in matched}
    return [run for run in runs if id(run) in selected]


def _todo(runs: Sequence[Run]) -> list[Run]:
    """The runs not yet finished, printing a `skip` line for each finished one."""
    todo = []
    for run in runs:
        if is_finished(run.workdir, run.steps):
            print(f"skip {run.name}: finished ({run.steps} steps)", flush=True)
        else:
            todo.append(run)
    return todo


def _lock_sweep_dir(sweep_dir: str) -> workdir_lock.DirectoryLock:
    """The run lock of `sweep_dir` for this sweep command, so a second sweep on it fails at once."""
    try:
        return workdir_lock.acquire_run_lock(sweep_dir, "launch.sweep")
    except WorkdirError as error:
        raise SweepError(str(error)) from None


def run_sweep(config_arg: str, sweep_dir: str, backend: str = "local", extra_args: Sequence[str] = (),
              parallel: int = 1, dry_run: bool = False, devices_per_run: int = 0, num_devices: int = 0,
              remote: RemoteOptions = RemoteOptions(), env: Mapping[str, str] | None = None,
              run_timeout: float = 0.0, only: Sequence[str] = ()) -> list[str]:
    """Validates every run, writes sweep.json, then runs (local) or prints (tpu, slurm, dry run) the runs that
    match an `only` filter (see `select_runs`; all runs without one). sweep.json lists every run either way.

    Returns the names of the runs that failed. `num_devices` is the device count each run is validated for
    (0 = devices_per_run or 1 locally, nodes * GPUs per node for slurm with GPUs, else the config's mesh).
    """
    if backend not in BACKENDS:
        raise SweepError(f"--backend={backend}: use one of {', '.join(BACKENDS)}")
    if parallel < 1:
        raise SweepError(f"--parallel={parallel} must be >= 1")
    if backend == "slurm":
        sweep_dir = os.path.abspath(sweep_dir)  # job scripts `cd` to the repository first
    devices = num_devices or {"local": devices_per_run or 1, "tpu": None,
                              "slurm": remote.slurm_nodes * remote.slurm_gpus_per_node or None}[backend]
    every_run = expand_sweep(config_arg, sweep_dir, extra_args, devices)
    runs = select_runs(every_run, only, config_arg)
    chosen = f", {len(runs)} chosen by --only: {', '.join(run.name for run in runs)}" if only else ""
    print(f"sweep of {len(every_run)} runs of {config_arg} in {sweep_dir} ({backend}){chosen}", flush=True)
    if backend == "local" and dry_run:
        for index, run in enumerate(_todo(runs)):
            slot = slot_devices(index % parallel, devices_per_run)
            prefix = [f"CUDA_VISIBLE_DEVICES={slot}"] if devices_per_run else []
            print(shlex.join([*prefix, "python", "-m", "llm_jax.train", *train_args(config_arg, run, extra_args)]))
        return []
    with _lock_sweep_dir(sweep_dir):
        write_sweep_file(sweep_dir, sweep_record(config_arg, backend, extra_args, every_run))
        todo = _todo(runs)
        if backend == "tpu":
            _print_tpu(config_arg, todo, extra_args, remote)
            return []
        if backend == "slurm":
            _write_slurm(config_arg, todo, extra_args, remote, sweep_dir)
            return []
        failed = run_local(config_arg, todo, extra_args, parallel, devices_per_run, env, run_timeout)
    print(f"done: {len(todo) - len(failed)} ran, {len(runs) - len(todo)} skipped, {len(failed)} failed", flush=True)
    return failed


# ----------------------------------------------------------------------------- command line

def define_flags() -> None:
    """The command-line flags (defined only when run as a program, so importing this module defines none)."""
    flags.DEFINE_string("config", None, "experiment file with get_sweep(), e.g. experiments/x.py[:variant]")
    flags.DEFINE_string("sweep_dir", None, "directory of sweep.json and one work directory per run")
    flags.DEFINE_enum("backend", "local", BACKENDS, "local: run here; tpu/slurm: print the commands")
    flags.DEFINE_integer("parallel", 1, "local runs at a time")
    flags.DEFINE_bool("dry_run", False, "local: print the train commands instead of running them")
    flags.DEFINE_integer("devices_per_run", 0, "local GPUs per run: slot i gets CUDA_VISIBLE_DEVICES i*N..i*N+N-1 "
                         "(0 = leave CUDA_VISIBLE_DEVICES alone)")
    flags.DEFINE_integer("num_devices", 0, "devices per run to validate configs for (0 = devices_per_run or 1 "
                         "locally; slurm_nodes * slurm_gpus_per_node for slurm; else the config's mesh)")
    flags.DEFINE_float("run_timeout", 0.0, "local: SIGTERM a run after this many seconds (0 = none)")
    flags.DEFINE_multi_string("only", [], "run only the matching points: KEY=VALUE terms joined by commas that "
                              "must all hold (KEY dotted or as in run names, e.g. learning_rate=0.001,d_model=64), "
                              "or a run's name; repeat the flag for more points")
    flags.DEFINE_string("tpu_name", "TPU_NAME", "tpu: the TPU VM name")
    flags.DEFINE_string("zone", "ZONE", "tpu: the TPU VM zone")
    flags.DEFINE_string("repo_dir", "", "tpu/slurm: this repository's path on the remote machines "
                        "('' = llm_jax in $HOME on TPU VMs, the current directory for slurm)")
    flags.DEFINE_integer("slurm_nodes", 1, "slurm: nodes per run (one train process per node)")
    flags.DEFINE_integer("slurm_gpus_per_node", 0, "slurm: #SBATCH --gpus-per-node (0 = omit)")
    flags.DEFINE_string("slurm_time", "", "slurm: #SBATCH --time, e.g. 04:00:00 (empty = omit)")
    flags.DEFINE_string("slurm_partition", "", "slurm: #SBATCH --partition (empty = omit)")
    flags.mark_flags_as_required(["config", "sweep_dir"])


def main(argv: list[str]) -> None:
    f = flags.FLAGS
    extra_args = argv[1:]  # everything after `--`
    remote = RemoteOptions(f.tpu_name, f.zone, f.repo_dir, f.slurm_nodes, f.slurm_gpus_per_node, f.slurm_time,
                           f.slurm_partition)
    try:
        failed = run_sweep(f.config, f.sweep_dir, f.backend, extra_args, f.parallel, f.dry_run, f.devices_per_run,
                           f.num_devices, remote, run_timeout=f.run_timeout, only=f.only)
    except SweepError as error:
        raise SystemExit(f"error: {error}") from None
    if failed:
        raise SystemExit(f"error: {len(failed)} run(s) failed: {', '.join(failed)} "
                         f"(see {os.path.join(f.sweep_dir, 'NAME', LOG_FILE)}); re-run the sweep to retry them")


if __name__ == "__main__":
    define_flags()
    app.run(main)
