"""Does the training input pipeline keep up? Pipeline delivery against training consumption, and its memory.

    python benchmarks/pipeline_throughput.py [--experiments shakespeare_char,wikitext2] [--drain_seconds 60]
        [--drain_batches 0] [--train_steps 200] [--workers 0,1] [--tfds_data_dir DIR] [--json_out FILE]

Per experiment (`experiments/NAME.py`, `NAME:variant` works too):

1. Training consumption: a short `llm_jax.train` run in a subprocess (evaluation and checkpoints off but for the
   final ones); the mean `train/tokens_per_second` over its log windows, the first (compile, warm-up) excluded.
   The trainer counts tokens as the sum of the loss weights.
2. Pipeline delivery: `build_data` in this process, then `next_chunk(train.steps_per_dispatch)` as fast as
   possible, for every `data.num_workers` in --workers (the windows pipeline has no workers: 0 only). Tokens/s
   counted as the sum of the weights (comparable to 1) and as batch*seq_len slots. The build (TFDS prepare on
   the first build of a data source, tokenizer training) and the first chunk (worker start-up) are timed on
   their own and left out of the rate.
3. Memory: RSS of this process plus its descendants (Grain workers) from /proc, sampled every --sample_seconds
   during the drain; "start" is the first sample after 10% of the drain, growth is end - start. Worker RSS is
   summed per process, so pages they share are counted more than once.
4. Pipeline tokens/s / training tokens/s, PASS at >= 10x.

TFDS datasets are prepared in a temporary directory (used by both the drain and the training run) unless
--tfds_data_dir is given.
"""

from __future__ import annotations

import argparse
import gc
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import ml_collections
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # this checkout's llm_jax and launch, wherever the script is started from

from launch.sweep import load_experiment, split_config_arg  # noqa: E402
from llm_jax.config import override  # noqa: E402
from llm_jax.training.metrics import read_metrics  # noqa: E402

MIB = 1024 * 1024
TARGET_RATIO = 10.0
WARMUP_FRACTION = 0.1  # RSS "start" is the first sample after this fraction of the drain


def experiment_config(experiment: str) -> ml_collections.ConfigDict:
    """get_config() of experiments/NAME.py, or of NAME:variant."""
    name, variant = split_config_arg(experiment)
    return load_experiment(os.path.join(REPO, "experiments", f"{name}.py")).get_config(variant)


# --- memory, from /proc -------------------------------------------------------------------------------------


def rss_bytes(pid: int | str) -> int:
    """VmRSS of a process from /proc/PID/status; 0 when it has exited or shows none (a zombie)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def descendants(pid: int | str) -> list[int]:
    """Every live descendant of a process (children of all its threads, recursively)."""
    found: list[int] = []
    for children_file in glob.glob(f"/proc/{pid}/task/*/children"):
        try:
            with open(children_file, encoding="ascii") as f:
                children = [int(child) for child in f.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
        for child in children:
            found += [child, *descendants(child)]
    return found


def sample_rss(elapsed: float, progress: float) -> dict[str, float]:
    """One memory sample: this process and the sum over its descendants, in bytes."""
    children = descendants("self")
    return {"seconds": elapsed, "progress": progress, "self": rss_bytes("self"),
            "children": sum(rss_bytes(pid) for pid in children), "num_children": len(children)}


def memory_summary(samples: list[dict[str, float]]) -> dict[str, float]:
    """RSS (self + children, MiB) at the first sample after the warm-up fraction, at the end, and the max."""
    totals = [(sample["progress"], (sample["self"] + sample["children"]) / MIB) for sample in samples]
    start = next((total for progress, total in totals if progress >= WARMUP_FRACTION), totals[-1][1])
    end = totals[-1][1]
    return {"rss_start_mib": start, "rss_end_mib": end, "rss_max_mib": max(total for _, total in totals),
            "rss_growth_mib": end - start, "children_end_mib": samples[-1]["children"] / MIB,
            "num_children": samples[-1]["num_children"], "num_samples": len(samples)}


# --- 2 and 3: the pipeline drained in this process ----------------------------------------------------------


def drain(config: ml_collections.ConfigDict, seconds: float, batches: int, sample_seconds: float) -> dict[str, Any]:
    """Builds the training stream and pulls chunks of train.steps_per_dispatch batches until `seconds` have
    passed (or `batches` batches, when > 0); rates count from after the first chunk."""
    from llm_jax.data.pipeline import build_data

    per_chunk = config.train.steps_per_dispatch
    start = time.perf_counter()
    data = build_data(config)
    build_seconds = time.perf_counter() - start
    try:
        start = time.perf_counter()
        data.train.next_chunk(per_chunk)
        first_chunk_seconds = time.perf_counter() - start
        tokens = slots = drained = 0
        start = last_sample = time.perf_counter()
        samples = [sample_rss(0.0, 0.0)]
        while True:
            weights = data.train.next_chunk(per_chunk)["weights"]
            tokens, slots, drained = tokens + float(weights.sum()), slots + weights.size, drained + per_chunk
            now = time.perf_counter()
            progress = drained / batches if batches > 0 else (now - start) / seconds
            if progress >= 1.0 or now - last_sample >= sample_seconds:
                samples.append(sample_rss(now - start, progress))
                last_sample = now
            if progress >= 1.0:
                break
        elapsed = time.perf_counter() - start
    finally:
        data.train.close()
        del data
        gc.collect()
    return {"build_seconds": build_seconds, "first_chunk_seconds": first_chunk_seconds, "drain_seconds": elapsed,
            "batches": drained, "tokens_per_second": tokens / elapsed, "slots_per_second": slots / elapsed,
            "weight_fraction": tokens / max(slots, 1), **memory_summary(samples), "rss_samples": samples}


# --- 1: training consumption --------------------------------------------------------------------------------


def training_throughput(experiment: str, steps: int, log_every: int, env: dict[str, str]) -> dict[str, Any]:
    """Mean train/tokens_per_second of a short llm_jax.train run, its first log window left out."""
    name, variant = split_config_arg(experiment)
    config_arg = f"experiments/{name}.py" + (f":{variant}" if variant is not None else "")
    with tempfile.TemporaryDirectory(prefix="pipeline_throughput_train_") as workdir:
        command = [sys.executable, "-m", "llm_jax.train", f"--config={config_arg}", f"--workdir={workdir}",
                   f"--config.train.steps={steps}", f"--config.train.log_every={log_every}",
                   "--config.train.eval_every=0", "--config.train.eval_steps=1", "--config.train.checkpoint_every=0"]
        start = time.perf_counter()
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
        wall_seconds = time.perf_counter() - start
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-4000:]}")
        records = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    windows = [r for r in records if "train/tokens_per_second" in r]
    if len(windows) < 2:
        raise RuntimeError(f"{len(windows)} train log window(s) in {steps} steps (log_every={log_every}): need two "
                           "or more, the first being excluded; raise --train_steps or lower --log_every")
    rates = [r["train/tokens_per_second"] for r in windows[1:]]
    return {"tokens_per_second": float(np.mean(rates)), "window_rates": rates, "steps": steps,
            "first_window_step": windows[0]["step"], "wall_seconds": wall_seconds}


# --- the report ---------------------------------------------------------------------------------------------


def benchmark_experiment(experiment: str, args: argparse.Namespace, env: dict[str, str]) -> list[dict[str, Any]]:
    """One row per worker count: the drains first (so the first build includes TFDS prepare), then training."""
    config = experiment_config(experiment)
    workers = args.workers if config.data.pipeline == "grain" else [0]
    rows = []
    for num_workers in workers:
        print(f"[{experiment}] draining the {config.data.pipeline} pipeline, data.num_workers={num_workers} ...",
              file=sys.stderr, flush=True)
        worker_config = override(experiment_config(experiment), [("data.num_workers", num_workers)])
        rows.append({"experiment": experiment, "pipeline": config.data.pipeline, "num_workers": num_workers,
                     "batch": config.train.batch_size, "seq_len": config.data.seq_len,
                     **drain(worker_config, args.drain_seconds, args.drain_batches, args.sample_seconds)})
    print(f"[{experiment}] training {args.train_steps} steps ...", file=sys.stderr, flush=True)
    train = training_throughput(experiment, args.train_steps, args.log_every, env)
    for row in rows:
        row["train"] = train
        row["ratio"] = row["tokens_per_second"] / train["tokens_per_second"]
        row["passed"] = row["ratio"] >= TARGET_RATIO
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The printed report: one line per (experiment, data.num_workers)."""
    header = ["experiment", "pipeline", "workers", "build s", "1st chunk s", "drained batches / s",
              "pipeline tok/s (weights)", "pipeline slots/s", "train tok/s", "ratio", f">= {TARGET_RATIO:g}x",
              "RSS start MiB", "RSS end MiB", "RSS max MiB", "RSS growth MiB", "of which workers MiB"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        cells = [row["experiment"], row["pipeline"], str(row["num_workers"]), f"{row['build_seconds']:.1f}",
                 f"{row['first_chunk_seconds']:.2f}", f"{row['batches']:,} / {row['drain_seconds']:.0f}",
                 f"{row['tokens_per_second']:,.0f}", f"{row['slots_per_second']:,.0f}",
                 f"{row['train']['tokens_per_second']:,.0f}", f"{row['ratio']:,.1f}x",
                 "PASS" if row["passed"] else "FAIL", f"{row['rss_start_mib']:.0f}", f"{row['rss_end_mib']:.0f}",
                 f"{row['rss_max_mib']:.0f}", f"{row['rss_growth_mib']:+.1f}", f"{row['children_end_mib']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    """The command line, with --experiments and --workers split into lists."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiments", default="shakespeare_char,wikitext2",
                        help="comma-separated experiment names (experiments/NAME.py), NAME:variant allowed")
    parser.add_argument("--drain_seconds", type=float, default=60.0, help="length of each pipeline drain")
    parser.add_argument("--drain_batches", type=int, default=0, help="drain this many batches instead (> 0)")
    parser.add_argument("--sample_seconds", type=float, default=2.0, help="seconds between RSS samples")
    parser.add_argument("--train_steps", type=int, default=200, help="steps of the training run")
    parser.add_argument("--log_every", type=int, default=50, help="train log window (the first is excluded)")
    parser.add_argument("--workers", default="0,1", help="comma-separated data.num_workers for grain pipelines")
    parser.add_argument("--tfds_data_dir", default="", help="where TFDS data is prepared (default: a temp dir)")
    parser.add_argument("--json_out", default="", help="also write every number (and RSS samples) here")
    args = parser.parse_args()
    args.experiments = [name.strip() for name in args.experiments.split(",") if name.strip()]
    args.workers = [int(count) for count in args.workers.split(",") if count.strip()]
    return args


def main() -> None:
    """Benchmarks every experiment, prints the table, writes --json_out."""
    args = parse_args()
    tfds_dir = args.tfds_data_dir or tempfile.mkdtemp(prefix="pipeline_throughput_tfds_")
    os.environ["TFDS_DATA_DIR"] = os.path.abspath(tfds_dir)  # read by build_data here and by the training run
    try:
        rows = [row for experiment in args.experiments
                for row in benchmark_experiment(experiment, args, dict(os.environ))]
    finally:
        if not args.tfds_data_dir:
            shutil.rmtree(tfds_dir, ignore_errors=True)
    print(markdown_table(rows))
    print(f"\ntrain tok/s: mean over log windows of {args.log_every} steps after the first, of a "
          f"{args.train_steps}-step run; RSS = this process + worker processes (shared pages counted per process).")
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
