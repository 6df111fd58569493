"""Compile time of the train step against depth, looped vs scanned blocks (model.scan_layers), and peak memory
per device of each remat policy (model.remat), from ahead-of-time compiles only: nothing is trained.

    python benchmarks/scan_compile.py [--depths 2,4,8,16,24] [--remat_depth 8] [--json scan_compile.json]

Each row compiles the jitted train chunk that llm_jax.train runs (llm_jax.training.run.jit_train_chunk, one
step per dispatch) from abstract inputs, as `llm_jax.train --compile_only` does, for a decoder of d_model 128,
4 heads, seq 128, batch 8 on one device. "trace + lower" is Python tracing and StableHLO lowering, "compile"
is XLA's; the issue's target is a 24-layer scanned total within 2x of the 2-layer one. The persistent
compilation cache is off so every figure is a fresh compile. Prints Markdown tables and writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # this checkout's llm_jax, wherever the script is started from

import jax  # noqa: E402
import ml_collections  # noqa: E402

from llm_jax import config as config_lib  # noqa: E402
from llm_jax.models.remat import REMAT_POLICIES  # noqa: E402
from llm_jax.training.aot import abstract_batches  # noqa: E402
from llm_jax.training.run import build_run, jit_train_chunk  # noqa: E402

MIB = 2 ** 20


def bench_config(text_path: str, num_layers: int, scan_layers: bool, remat: str) -> ml_collections.ConfigDict:
    config = config_lib.default_config()
    config.model.update(num_layers=num_layers, num_heads=4, d_model=128, max_len=128, scan_layers=scan_layers,
                        remat=remat)
    config.data.update(path=text_path, pipeline="windows", tokenizer="char", seq_len=128)
    config.train.update(batch_size=8, steps=10, steps_per_dispatch=1)
    config.mesh.update(data=1, fsdp=1, tensor=1)
    return config


def measure(text_path: str, num_layers: int, scan_layers: bool, remat: str) -> dict:
    """Seconds to trace + lower and to compile one train chunk, and the compiled program's memory per device."""
    with tempfile.TemporaryDirectory() as workdir:
        run = build_run(bench_config(text_path, num_layers, scan_layers, remat), workdir, devices=jax.devices()[:1])
        jitted = jit_train_chunk(run)
        with jax.set_mesh(run.mesh), run.rules_context():
            start = time.perf_counter()
            lowered = jitted.lower(run.abstract_state, abstract_batches(run))
            traced = time.perf_counter()
            compiled = lowered.compile()
            done = time.perf_counter()
    memory = compiled.memory_analysis()
    peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
            - memory.alias_size_in_bytes)
    return {"num_layers": num_layers, "scan_layers": scan_layers, "remat": remat,
            "trace_lower_seconds": traced - start, "compile_seconds": done - traced, "total_seconds": done - start,
            "temp_bytes": memory.temp_size_in_bytes, "peak_bytes_estimate": peak}


def cpu_model() -> str:
    """The CPU model name (speed figures are only comparable on one kind of CPU)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def compile_table(rows: list[dict]) -> list[str]:
    lines = ["| layers | layout | trace + lower s | compile s | total s | total / 2-layer total |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        base = next(r for r in rows
                    if r["scan_layers"] == row["scan_layers"] and r["num_layers"] == rows[0]["num_layers"])
        layout = "scanned" if row["scan_layers"] else "looped"
        lines.append(f"| {row['num_layers']} | {layout} | {row['trace_lower_seconds']:.2f} | "
                     f"{row['compile_seconds']:.2f} | {row['total_seconds']:.2f} | "
                     f"{row['total_seconds'] / base['total_seconds']:.2f}x |")
    return lines


def memory_table(rows: list[dict]) -> list[str]:
    lines = ["| remat | layout | layers | temp MiB | peak estimate MiB | compile s |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        layout = "scanned" if row["scan_layers"] else "looped"
        lines.append(f"| {row['remat']} | {layout} | {row['num_layers']} | {row['temp_bytes'] / MIB:.1f} | "
                     f"{row['peak_bytes_estimate'] / MIB:.1f} | {row['total_seconds']:.2f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", default="2,4,8,16,24")
    parser.add_argument("--remat_depth", type=int, default=8)
    parser.add_argument("--json", default="scan_compile.json")
    args = parser.parse_args()
    jax.config.update("jax_enable_compilation_cache", False)
    depths = [int(d) for d in args.depths.split(",")]
    with tempfile.TemporaryDirectory() as data_dir:
        text_path = os.path.join(data_dir, "text.txt")
        with open(text_path, "w") as f:
            f.write("the quick brown fox jumps over the lazy dog\n" * 400)
        compile_rows = [measure(text_path, depth, scan, "none") for scan in (False, True) for depth in depths]
        remat_rows = [measure(text_path, args.remat_depth, scan, policy)
                      for scan in (False, True) for policy in REMAT_POLICIES.names()]
    print(f"CPU: {cpu_model()}, jax {jax.__version__}, backend {jax.default_backend()}\n")
    print("\n".join(compile_table(compile_rows)) + "\n")
    print("\n".join(memory_table(remat_rows)))
    with open(args.json, "w") as f:
        json.dump({"compile": compile_rows, "remat": remat_rows}, f, indent=2)


if __name__ == "__main__":
    main()
