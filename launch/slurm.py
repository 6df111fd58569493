"""Writes (and with --submit, submits) a SLURM batch script that trains with one process per GPU.

    python -m launch.slurm --nodes=2 --gpus_per_node=8 --partition=gpu --time=12:00:00 --submit -- \\
        --config=experiments/shakespeare_char.py --workdir=/shared/runs/sc --config.model.dtype=bfloat16

The script asks for N nodes with G GPUs and G tasks each and runs `srun python -m llm_jax.train ARGS`
in this checkout. With more than one task (SLURM_NTASKS > 1) llm_jax initialises jax.distributed from
the SLURM environment: the coordinator is the first node, and task I uses local GPU SLURM_LOCALID.
`srun --kill-on-bad-exit=1` ends the whole job when one task fails, so a dead task never leaves the
others waiting. The job's output goes to DIR/JOB_NAME-JOBID.out next to the script.
"""

from __future__ import annotations

import pathlib
import re
import shlex
import shutil
import subprocess
import sys
from typing import Sequence

from absl import app, flags

from launch.processes import check_train_args

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TIME_PATTERN = re.compile(r"^(\d+-)?\d{1,2}:\d{2}:\d{2}$")


def define_flags() -> None:
    """The command-line flags (defined only when run as a program: importing this module defines none)."""
    flags.DEFINE_integer("nodes", 1, "nodes to allocate", lower_bound=1)
    flags.DEFINE_integer("gpus_per_node", 1, "GPUs per node; one training process each", lower_bound=1)
    flags.DEFINE_integer("cpus_per_task", 8, "CPU cores per process (data loading, host loop)", lower_bound=1)
    flags.DEFINE_string("partition", None, "SLURM partition; default: the cluster's")
    flags.DEFINE_string("time", "01:00:00", "wall-clock limit, [D-]HH:MM:SS")
    flags.DEFINE_string("account", None, "account to charge; default: yours")
    flags.DEFINE_string("job_name", "llm_jax", "job name (also names the script and its log)")
    flags.DEFINE_string("script", None, "where to write the script; default: runs/slurm/JOB_NAME.sbatch here")
    flags.DEFINE_string("python", "python", "python interpreter on the nodes")
    flags.DEFINE_string("setup", None, "shell line run before srun, e.g. 'source venv/bin/activate'")
    flags.DEFINE_bool("submit", False, "submit the script with sbatch (default: only write and print it)")


def _check_directive_values(**values: str | None) -> None:
    """#SBATCH lines are not shell-parsed: a value with whitespace or a newline would corrupt the script."""
    for name, value in values.items():
        if value is not None and (not value or re.search(r"\s", value)):
            raise ValueError(f"--{name}={value!r} must be non-empty and contain no whitespace")


def sbatch_directives(nodes: int, gpus_per_node: int, *, cpus_per_task: int, time: str, job_name: str,
                      output: str, partition: str | None, account: str | None) -> list[str]:
    """The #SBATCH lines: G tasks per node, one per GPU."""
    lines = [f"--job-name={job_name}", f"--nodes={nodes}", f"--ntasks-per-node={gpus_per_node}",
             f"--gpus-per-node={gpus_per_node}", f"--cpus-per-task={cpus_per_task}", f"--time={time}",
             f"--output={output}"]
    if partition:
        lines.append(f"--partition={partition}")
    if account:
        lines.append(f"--account={account}")
    return [f"#SBATCH {line}" for line in lines]


def sbatch_script(train_args: Sequence[str], nodes: int, gpus_per_node: int, *, time: str = "01:00:00",
                  partition: str | None = None, account: str | None = None, job_name: str = "llm_jax",
                  cpus_per_task: int = 8, output: str = "runs/slurm/%x-%j.out", python: str = "python",
                  setup: str | None = None) -> str:
    """The batch script's text; `output` may use sbatch's %x (job name) and %j (job id) patterns."""
    check_train_args(train_args)
    if nodes < 1 or gpus_per_node < 1 or cpus_per_task < 1:
        raise ValueError(f"nodes={nodes}, gpus_per_node={gpus_per_node} and cpus_per_task={cpus_per_task} "
                         "must be >= 1")
    if not TIME_PATTERN.match(time):
        raise ValueError(f"--time={time!r} must look like HH:MM:SS or D-HH:MM:SS")
    _check_directive_values(partition=partition, account=account, job_name=job_name, output=output)
    srun = (f"srun --kill-on-bad-exit=1 {shlex.quote(python)} -m llm_jax.train " + shlex.join(train_args))
    # no `set -u`: environment setup lines (conda, module load) often read unset variables
    body = ["set -eo pipefail", f"cd {shlex.quote(str(REPO_ROOT))}", "export PYTHONUNBUFFERED=1",
            'echo "job $SLURM_JOB_ID: $SLURM_NTASKS tasks on $SLURM_JOB_NODELIST"']
    if setup:
        body.append(setup)
    directives = sbatch_directives(nodes, gpus_per_node, cpus_per_task=cpus_per_task, time=time, job_name=job_name,
                                   output=output, partition=partition, account=account)
    return "\n".join(["#!/bin/bash", *directives, "", *body, srun]) + "\n"


def write_script(text: str, path: pathlib.Path) -> None:
    """Writes the script (and creates its directory, which sbatch also needs for the log file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def submit(path: pathlib.Path) -> int:
    """`sbatch PATH`, bounded; a clear message where sbatch is missing."""
    if shutil.which("sbatch") is None:
        sys.stderr.write(f"error: sbatch is not installed here; run `sbatch {shlex.quote(str(path))}` on a SLURM "
                         "login node\n")
        return 127
    try:
        result = subprocess.run(["sbatch", str(path)], timeout=120)
    except subprocess.TimeoutExpired:
        sys.stderr.write("error: sbatch did not answer within 120s\n")
        return 124
    if result.returncode != 0:
        sys.stderr.write(f"error: sbatch exited with status {result.returncode}\n")
    return result.returncode


def main(argv: list[str]) -> None:
    f = flags.FLAGS
    path = pathlib.Path(f.script or REPO_ROOT / "runs" / "slurm" / f"{f.job_name}.sbatch").resolve()
    try:
        text = sbatch_script(argv[1:], f.nodes, f.gpus_per_node, time=f.time, partition=f.partition,
                             account=f.account, job_name=f.job_name, cpus_per_task=f.cpus_per_task,
                             output=str(path.parent / "%x-%j.out"), python=f.python, setup=f.setup)
    except ValueError as error:
        raise app.UsageError(str(error)) from None
    try:
        write_script(text, path)
    except OSError as error:
        raise SystemExit(f"error: cannot write {path}: {error}") from None
    print(path)
    print(text, end="")
    if f.submit:
        sys.exit(submit(path))


if __name__ == "__main__":
    define_flags()
    app.run(main)
