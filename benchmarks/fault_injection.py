"""Faults injected into real training runs, each followed by a rerun of the same command; prints a table of how
many runs resumed exactly (every logged train/loss and the final eval/loss equal to an uninterrupted run's) and
the most work lost (steps recomputed after the resume).

    python benchmarks/fault_injection.py --seeds=3 [--full_disk] [--only=SIGTERM]   # --full_disk mounts a tmpfs (root)

Faults: SIGTERM at a random step; SIGKILL at a random step; SIGKILL at a random moment of a checkpoint write;
a torn metrics line (what a SIGKILL during a metrics write leaves) after a SIGKILL; a truncated newest
checkpoint resumed with --restore_fallback; a full disk during a save, then the disk grown and the run resumed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from llm_jax.training.checkpoint import committed_steps  # noqa: E402
from llm_jax.training.metrics import read_run_metrics  # noqa: E402

STEPS = 200
ARGS = ["--config=experiments/python_docs.py:quick", f"--config.train.steps={STEPS}",
        "--config.train.steps_per_dispatch=2", "--config.train.log_every=2", "--config.train.eval_every=100",
        "--config.train.checkpoint_every=20", "--config.train.keep_checkpoints=3"]
ENV = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "JAX_PLATFORMS": "cpu",
       "PYTHONPATH": REPO_ROOT}


def _start(workdir: str, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "llm_jax.train", *ARGS, f"--workdir={workdir}", *extra]
    return subprocess.Popen(command, cwd=REPO_ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def _train(workdir: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llm_jax.train", *ARGS, f"--workdir={workdir}", *extra],
                          cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=900)


def _losses(workdir: str) -> list[tuple[int, float | None, float | None]]:
    return [(r["step"], r.get("train/loss"), r.get("eval/loss")) for r in read_run_metrics(workdir)
            if "train/loss" in r or "eval/loss" in r]


def _wait_for_step(process: subprocess.Popen, step: int) -> int:
    """Reads the trainer's progress lines until one at or after `step`; that step."""
    for line in process.stderr:
        if "| loss " in line and "step " in line:
            logged = int(line.split("step ")[1].split("/")[0])
            if logged >= step:
                return logged
    raise RuntimeError("the trainer ended before the step")


def _stop(process: subprocess.Popen, signum: int) -> int:
    process.send_signal(signum)
    process.stderr.read()
    return process.wait(timeout=300)


def _kill_at_step(workdir: str, rng: random.Random, signum: int, first: int = 10) -> tuple[int, str]:
    process = _start(workdir)
    logged = _wait_for_step(process, rng.randrange(first, STEPS - 20))
    status = _stop(process, signum)
    return logged, f"exit {status}"


def _kill_mid_checkpoint(workdir: str, rng: random.Random) -> tuple[int, str]:
    """SIGKILL a random 0-30 ms after a checkpoint's temporary directory appears (after step 40)."""
    process = _start(workdir)
    _wait_for_step(process, 40)
    root = os.path.join(workdir, "checkpoints")
    while not any(".orbax-checkpoint-tmp" in name for name in os.listdir(root)):
        time.sleep(0.0005)
    time.sleep(rng.uniform(0.0, 0.03))
    unfinished = [name for name in os.listdir(root) if ".orbax-checkpoint-tmp" in name]
    status = _stop(process, signal.SIGKILL)
    logged = max((r["step"] for r in read_run_metrics(workdir)), default=0)
    return logged, f"exit {status}, killed while writing {unfinished or 'nothing (already renamed)'}"


def _torn_metrics(workdir: str, rng: random.Random) -> tuple[int, str]:
    logged, status = _kill_at_step(workdir, rng, signal.SIGKILL)
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write('{"step": 99999, "train/lo')
    return logged, status + ", torn line appended"


def _corrupt_newest(workdir: str, rng: random.Random) -> tuple[int, str]:
    """SIGKILL after step 70 (two checkpoints committed), then the newest one's state files cut in half."""
    logged, status = _kill_at_step(workdir, rng, signal.SIGKILL, first=70)
    newest = committed_steps(os.path.join(workdir, "checkpoints"))[-1]
    for folder, _, files in os.walk(os.path.join(workdir, "checkpoints", str(newest), "state")):
        for name in files:
            path = os.path.join(folder, name)
            os.truncate(path, os.path.getsize(path) // 2)
    named = _train(workdir)
    message = named.stderr.strip().splitlines()[-1] if named.returncode else "NOT REFUSED"
    return logged, f"{status}; step {newest} truncated; plain rerun: {message[:160]}"


FAULTS = {"SIGTERM at a random step": lambda w, r: _kill_at_step(w, r, signal.SIGTERM),
          "SIGKILL at a random step": lambda w, r: _kill_at_step(w, r, signal.SIGKILL),
          "SIGKILL during a checkpoint write": _kill_mid_checkpoint,
          "torn metrics.jsonl line after SIGKILL": _torn_metrics,
          "newest checkpoint truncated (--restore_fallback)": _corrupt_newest}


def _resume(workdir: str, fault: str) -> tuple[subprocess.CompletedProcess, int]:
    extra = ["--restore_fallback"] if "restore_fallback" in fault else []
    result = _train(workdir, *extra)
    resumed = [line for line in result.stderr.splitlines() if "resumed from" in line]
    step = int(resumed[0].rsplit(" ", 1)[1]) if resumed else 0
    return result, step


def _full_disk_case(reference: list, scratch: str) -> dict:
    """Trains on a 600 KB tmpfs until a save fails, grows it to 16 MB, reruns."""
    mount = os.path.join(scratch, "tmpfs")
    os.makedirs(mount)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", mount], check=True)
    try:
        workdir = os.path.join(mount, "run")
        failed = _train(workdir)
        message = failed.stderr.strip().splitlines()[-1]
        subprocess.run(["mount", "-o", "remount,size=16m", mount], check=True)
        result, step = _resume(workdir, "full disk")
        exact = result.returncode == 0 and _losses(workdir) == reference
        logged = max((r["step"] for r in read_run_metrics(workdir) if r["step"] <= step), default=0)
        return {"fault": "full disk during a save", "exit": failed.returncode, "message": message[:200],
                "exact": exact, "lost": 0 if not step else logged - step}
    finally:
        subprocess.run(["umount", mount], check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--full_disk", action="store_true")
    parser.add_argument("--only", default="", help="run the faults whose name contains this text")
    args = parser.parse_args()
    scratch = tempfile.mkdtemp(prefix="llm_jax_faults_")
    reference_dir = os.path.join(scratch, "reference")
    assert _train(reference_dir).returncode == 0
    reference = _losses(reference_dir)
    rows = []
    for fault, inject in FAULTS.items():
        for seed in range(args.seeds if args.only in fault else 0):
            workdir = os.path.join(scratch, f"{len(rows)}")
            _, what = inject(workdir, random.Random(seed))
            logged = max((r["step"] for r in read_run_metrics(workdir)), default=0)  # the work done before
            result, step = _resume(workdir, fault)
            exact = result.returncode == 0 and _losses(workdir) == reference
            rows.append({"fault": fault, "seed": seed, "what": what, "last_logged": logged, "resumed_at": step,
                         "lost": max(0, logged - step), "exact": exact})
            print(json.dumps(rows[-1]), flush=True)
            shutil.rmtree(workdir, ignore_errors=True)
    if args.full_disk:
        rows.append(_full_disk_case(reference, scratch))
        print(json.dumps(rows[-1]), flush=True)
    _print_table(rows)
    shutil.rmtree(scratch, ignore_errors=True)


def _print_table(rows: list[dict]) -> None:
    print("\n| fault | runs | resumed exactly | most work lost (steps) |\n| --- | --- | --- | --- |")
    for fault in dict.fromkeys(row["fault"] for row in rows):
        mine = [row for row in rows if row["fault"] == fault]
        print(f"| {fault} | {len(mine)} | {sum(row['exact'] for row in mine)} | "
              f"{max(row['lost'] for row in mine)} |")


if __name__ == "__main__":
    main()
