"""Runs llm_jax.train on every worker of a Cloud TPU VM (a single host or a pod slice) through gcloud.

    python -m launch.tpu --tpu_name=my-v4-32 --zone=us-central2-b --repo_url=https://github.com/ME/llm_jax \\
        -- --config=experiments/shakespeare_char.py --workdir=runs/sc_tpu --config.model.dtype=bfloat16

prints two `gcloud compute tpus tpu-vm ssh NAME --worker=all --command=...` commands: setup (clone the
repository or fast-forward it to --branch, then `pip install -e . jax[tpu]`) and run (`python3 -m
llm_jax.train ARGS` in the checkout, on every worker at once; on a pod JAX finds the coordinator, the
process count and each process's id itself). With --run it executes them in order, streaming their
output, and stops at the first failure with that command's exit status. The train process lives as
long as the ssh session: start it from a machine that stays connected (or inside tmux/screen there).
--workdir is a path on the workers: on a pod slice every host writes checkpoints, so it must be storage
all workers share (e.g. an NFS mount), while metrics.jsonl is written by worker 0 alone.
"""

from __future__ import annotations

import pathlib
import shlex
import shutil
import subprocess
import sys
from typing import Sequence

from absl import app, flags

from launch.processes import check_train_args, describe_status, shell_status

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def define_flags() -> None:
    """The command-line flags (defined only when run as a program: importing this module defines none)."""
    flags.DEFINE_string("tpu_name", None, "name of the TPU VM (or pod slice)")
    flags.DEFINE_string("zone", None, "its zone, e.g. us-central2-b")
    flags.DEFINE_string("project", None, "Google Cloud project; default: gcloud's configured project")
    flags.DEFINE_string("repo_url", None, "git URL the workers clone; default: this checkout's `origin`")
    flags.DEFINE_string("branch", "main", "branch the workers check out")
    flags.DEFINE_string("repo_dir", "llm_jax", "checkout directory on the workers (relative to $HOME)")
    flags.DEFINE_string("python", "python3", "python interpreter on the workers")
    flags.DEFINE_bool("run", False, "execute the commands (default: only print them)")
    flags.DEFINE_bool("skip_setup", False, "only the run command (the workers are set up already)")
    flags.DEFINE_float("setup_timeout", 1800.0, "seconds the setup command may take with --run")
    flags.DEFINE_float("run_timeout", 0.0, "seconds the run command may take with --run; 0 = no limit")
    flags.mark_flags_as_required(["tpu_name", "zone"])


def setup_script(repo_url: str, branch: str, repo_dir: str, python: str = "python3") -> str:
    """Shell commands that clone `repo_url` at `branch` (or fast-forward an existing checkout) and install it."""
    url, ref, path, py = (shlex.quote(value) for value in (repo_url, branch, repo_dir, python))
    return (f"set -e; if [ -d {path}/.git ]; then git -C {path} fetch origin {ref} && git -C {path} checkout {ref} "
            f"&& git -C {path} merge --ff-only FETCH_HEAD; else git clone --branch {ref} {url} {path}; fi; "
            f"cd {path} && {py} -m pip install -q -e . 'jax[tpu]'")


def run_script(train_args: Sequence[str], repo_dir: str, python: str = "python3") -> str:
    """Shell command that runs llm_jax.train with `train_args` (each shell-quoted) in the checkout."""
    return (f"cd {shlex.quote(repo_dir)} && PYTHONUNBUFFERED=1 {shlex.quote(python)} -m llm_jax.train --jax_distributed "
            + shlex.join(train_args))


def ssh_command(tpu_name: str, zone: str, project: str | None, remote: str) -> list[str]:
    """`gcloud compute tpus tpu-vm ssh` running `remote` on every worker of the TPU VM."""
    command = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", tpu_name, f"--zone={zone}"]
    if project:
        command.append(f"--project={project}")
    return command + ["--worker=all", f"--command={remote}"]


def tpu_commands(tpu_name: str, zone: str, train_args: Sequence[str], *, repo_url: str, project: str | None = None,
                 branch: str = "main", repo_dir: str = "llm_jax", python: str = "python3") -> list[list[str]]:
    """[setup, run]: the gcloud commands (argument lists, no local shell involved) that set up and train."""
    check_train_args(train_args)
    for name, value in (("tpu_name", tpu_name), ("zone", zone), ("repo_url", repo_url), ("branch", branch)):
        if not value:
            raise ValueError(f"--{name} must not be empty")
    return [ssh_command(tpu_name, zone, project, setup_script(repo_url, branch, repo_dir, python)),
            ssh_command(tpu_name, zone, project, run_script(train_args, repo_dir, python))]


def default_repo_url() -> str:
    """The `origin` URL of the checkout this file is in; the workers clone the same repository."""
    try:
        result = subprocess.run(["git", "remote", "get-url", "origin"], capture_output=True, text=True, timeout=10,
                                cwd=REPO_ROOT)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise ValueError(f"--repo_url is not given and git could not tell this checkout's origin ({error})") from None
    if result.returncode != 0 or not result.stdout.strip():
        raise ValueError("--repo_url is not given and this checkout has no `origin` remote: pass the URL the TPU "
                         "workers should clone")
    return result.stdout.strip()


def execute(commands: Sequence[Sequence[str]], timeouts: Sequence[float | None]) -> int:
    """Runs the commands in order with inherited stdout/stderr; the first failure's status, or 0."""
    if shutil.which(commands[0][0]) is None:
        sys.stderr.write(f"error: {commands[0][0]} is not installed (https://cloud.google.com/sdk/docs/install)\n")
        return 127
    for command, timeout in zip(commands, timeouts, strict=True):
        try:
            returncode = subprocess.run(list(command), timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            sys.stderr.write(f"error: the command ran longer than {timeout:g}s and was killed\n")
            return 124
        if returncode != 0:
            sys.stderr.write(f"error: {command[0]} {describe_status(returncode)}\n")
            return shell_status(returncode)
    return 0


def _commands_from_flags(train_args: list[str]) -> tuple[list[list[str]], list[float | None]]:
    """The commands the flags ask for, and each one's time limit under --run."""
    f = flags.FLAGS
    if f.skip_setup:  # no clone, so no repository URL needed
        check_train_args(train_args)
        run = ssh_command(f.tpu_name, f.zone, f.project, run_script(train_args, f.repo_dir, f.python))
        return [run], [f.run_timeout or None]
    commands = tpu_commands(f.tpu_name, f.zone, train_args, repo_url=f.repo_url or default_repo_url(),
                            project=f.project, branch=f.branch, repo_dir=f.repo_dir, python=f.python)
    return commands, [f.setup_timeout, f.run_timeout or None]


def main(argv: list[str]) -> None:
    try:
        commands, timeouts = _commands_from_flags(argv[1:])
    except ValueError as error:
        raise app.UsageError(str(error)) from None
    for command in commands:
        print(shlex.join(command), flush=True)
    if flags.FLAGS.run:
        sys.exit(execute(commands, timeouts))


if __name__ == "__main__":
    define_flags()
    app.run(main)
