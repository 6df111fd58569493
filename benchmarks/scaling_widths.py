"""Training throughput, MFU and compile time against model width, through the real train command.

    python benchmarks/scaling_widths.py [--widths 128,256,512,1024] [--families decoder,encoder]
                                        [--steps 15] [--cpu_devices -1] [--json scaling_widths.json]

Each (family, width) trains `python -m llm_jax.train` for --steps updates at 4 layers, 128 tokens, head_dim
64: the decoder on Tiny Shakespeare characters (experiments/shakespeare_char.py), the encoder as a BERT
masked LM + NSP on WikiText-2 (experiments/bert_wikitext2.py, its SentencePiece tokenizer), dropout off in
both, the CPU split into one XLA device per core (`mesh.cpu_devices`, --cpu_devices). Tokens/s and train/mfu are the runs' own metrics (loss-bearing tokens: the encoder's padding is not
counted), the median over the log windows after the first (warm-up) one; compile time is the run's own
report. MFU is against this CPU's calibrated matmul peak (llm_jax.training.peak_flops), measured once
here into a private cache that every run reads, and once more at the end to show the drift of a shared
machine. Prints a Markdown table with the CPU model and flags; writes everything to --json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # this checkout's llm_jax, wherever the script is started from

from llm_jax import host_cpu  # noqa: E402  (importing llm_jax sets its default XLA_FLAGS)
from llm_jax.training import peak_flops  # noqa: E402
from llm_jax.training.metrics import METRICS_FILENAME, read_metrics  # noqa: E402

EXPERIMENTS = {"decoder": "experiments/shakespeare_char.py", "encoder": "experiments/bert_wikitext2.py"}



def cpu_description() -> dict:
    """The CPU model, usable cores and the ISA extensions XLA picks kernels by (llm_jax.host_cpu)."""
    return {"model": host_cpu.model_name(), "cores": host_cpu.usable_cores(),
            "matrix_flags": host_cpu.isa_extensions(), "xla_flags": os.environ.get("XLA_FLAGS", "")}


def train_args(family: str, width: int, args: argparse.Namespace, workdir: str) -> list[str]:
    per_dispatch = args.steps_per_dispatch
    return [f"--config={EXPERIMENTS[family]}", f"--workdir={workdir}",
            f"--config.model.d_model={width}", f"--config.model.num_heads={max(1, width // 64)}",
            f"--config.model.num_layers={args.layers}", f"--config.model.max_len={args.seq_len}",
            "--config.model.dropout=0.0", f"--config.data.seq_len={args.seq_len}",
            f"--config.train.batch_size={args.batch_size}", f"--config.train.steps={args.steps}",
            f"--config.train.steps_per_dispatch={per_dispatch}", f"--config.train.log_every={per_dispatch}",
            "--config.train.eval_every=0", "--config.train.eval_steps=1", "--config.train.checkpoint_every=0",
            f"--config.mesh.cpu_devices={args.cpu_devices}"]


def run_one(family: str, width: int, args: argparse.Namespace, env: dict[str, str]) -> dict:
    with tempfile.TemporaryDirectory() as workdir:
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "llm_jax.train", *train_args(family, width, args, workdir)],
                                cwd=REPO, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if result.returncode != 0:
            raise SystemExit(f"{family} width {width} failed:\n{result.stderr[-3000:]}")
        records = [r for r in read_metrics(os.path.join(workdir, METRICS_FILENAME)) if "train/loss" in r]
        where = json.load(open(os.path.join(workdir, "config.json")))["provenance"]
        peak, devices = where["peak_flops"], where["devices"]["count"]  # mesh.cpu_devices may split the CPU
    measured = records[1:] or records  # the first window holds the warm-up dispatches
    compile_s = re.search(r"compile time ([\d.]+)s", result.stderr)
    params = re.search(r"model: ([\d,]+) parameters", result.stderr)
    tokens_per_s = statistics.median(r["train/tokens_per_second"] for r in measured)
    mfu = statistics.median(r["train/mfu"] for r in measured) if "train/mfu" in measured[0] else None
    return {"family": family, "width": width, "heads": max(1, width // 64), "layers": args.layers,
            "params": int(params.group(1).replace(",", "")) if params else None,
            "tokens_per_second": tokens_per_s, "mfu": mfu,
            "devices": devices,
            "model_gflops_per_second": mfu * peak["flops_per_device"] * devices / 1e9 if mfu is not None else None,
            "compile_seconds": float(compile_s.group(1)) if compile_s else None, "wall_seconds": wall,
            "peak_source": peak["source"], "windows": [{k: r[k] for k in r if k.startswith(("step", "train/"))}
                                                       for r in records]}


def markdown(cpu: dict, peaks: dict, rows: list[dict], args: argparse.Namespace) -> str:
    lines = [f"CPU: {cpu['model']}, {cpu['cores']} cores; flags: {' '.join(cpu['matrix_flags'])}",
             f"XLA_FLAGS: {cpu['xla_flags'] or '(none)'}",
             f"calibrated f32 matmul peak: {peaks['before'] / 1e9:.1f} GFLOP/s (before the runs), "
             f"{peaks['after'] / 1e9:.1f} GFLOP/s (after); MFU is against the first",
             f"{args.layers} layers, head_dim 64, seq_len {args.seq_len}, batch {args.batch_size}, float32, "
             f"{args.steps} steps in dispatches of {args.steps_per_dispatch} (the first excluded)", "",
             "| family | width | devices | params | tokens/s | model GFLOP/s | MFU | compile s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "n/a"
        gflops = f"{row['model_gflops_per_second']:.1f}" if row["model_gflops_per_second"] is not None else "n/a"
        lines.append(f"| {row['family']} | {row['width']} | {row['devices']} | {row['params']:,} | {row['tokens_per_second']:,.0f} | "
                     f"{gflops} | {mfu} | {row['compile_seconds']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", default="128,256,512,1024")
    parser.add_argument("--families", default="decoder,encoder")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--cpu_devices", type=int, default=-1, help="mesh.cpu_devices of every run (-1: one XLA "
                        "device per core, data-parallel; 0: one device)")
    parser.add_argument("--steps_per_dispatch", type=int, default=5)
    parser.add_argument("--json", default="scaling_widths.json")
    args = parser.parse_args()
    cpu = cpu_description()
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, peak_flops.CACHE_DIR_ENV: cache, peak_flops.CALIBRATE_ENV: "1", "JAX_PLATFORMS": "cpu"}
        os.environ.update(env)
        peaks = {"before": peak_flops.calibrated_host_flops("float32")[0]}  # the runs read this cache entry
        rows = []
        for family in args.families.split(","):
            for width in (int(w) for w in args.widths.split(",")):
                rows.append(run_one(family, width, args, env))
                print(f"{family} {width}: {rows[-1]['tokens_per_second']:,.0f} tok/s", file=sys.stderr, flush=True)
        os.remove(peak_flops.cache_path())
        peaks["after"] = peak_flops.calibrated_host_flops("float32")[0]
    print(markdown(cpu, peaks, rows, args))
    with open(args.json, "w") as f:
        json.dump({"cpu": cpu, "peak_flops": peaks, "settings": vars(args), "rows": rows}, f, indent=1)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
