"""Where one CPU train step of the shakespeare_char recipe spends its time, in JAX and in PyTorch, in one run.

    python benchmarks/cpu_step_profile.py [--chunks 10] [--no_torch] [--json out.json] [--config.K=V ...]

JAX: the recipe's real train chunk (llm_jax.training.run.jit_train_chunk, `train.steps_per_dispatch` steps
per call) is timed, then traced with jax.profiler; every XLA:CPU kernel (thunk) is put in a category by
its kind (YNNPACK/dot = matmul, transpose/copy fusions, collectives) and, for the rest, by the model
component in its HLO op_name (attention, norms, MLP activation, loss, optimizer). A category's time is its
kernels' time summed over XLA's worker threads and divided by their number (so the rows add up to the traced
step); "idle + dispatch" is the rest: time a core waits for a dependency or for the runtime to start the
next kernel. PyTorch: the reference of benchmarks/torch_shakespeare_char.py,
profiled with torch.profiler (self CPU time per aten op, grouped the same way; "Python + dispatch" is wall
minus the ops' self time). The CPU model and its vector/matrix flags head the output.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

from llm_jax import xla_defaults  # noqa: E402  (importing llm_jax applies its XLA defaults)
from llm_jax import host_cpu  # noqa: E402

CATEGORIES = ("matmul", "attention (softmax, masks)", "norms", "MLP activation", "loss", "optimizer + clipping",
              "copies / transposes", "collectives (gradient all-reduce)", "other elementwise")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
# op_name fragments (HLO metadata of JAX, module paths of Flax) -> category, first match wins
COMPONENT_PATTERNS = (("_norm/", "norms"), ("/attention/", "attention (softmax, masks)"),
                      ("/mlp/", "MLP activation"), ("jvp(", "loss"), ("transpose(", "loss"))
TORCH_PATTERNS = (("mm", "matmul"), ("linear", "matmul"), ("scaled_dot_product", "attention (softmax, masks)"),
                  ("layer_norm", "norms"), ("gelu", "MLP activation"),
                  ("softmax", "loss"), ("nll", "loss"), ("cross_entropy", "loss"),
                  ("lerp", "optimizer + clipping"), ("addcdiv", "optimizer + clipping"),
                  ("addcmul", "optimizer + clipping"), ("sqrt", "optimizer + clipping"),
                  ("vector_norm", "optimizer + clipping"), ("foreach", "optimizer + clipping"),
                  ("copy", "copies / transposes"), ("cat", "copies / transposes"), ("clone", "copies / transposes"),
                  ("contiguous", "copies / transposes"))


def cpu_description() -> str:
    """The CPU model, usable cores and the vector/matrix ISA flags that decide which kernels XLA and PyTorch pick."""
    return host_cpu.describe()


def hlo_categories(hlo_text: str) -> dict[str, str]:
    """Kernel (HLO instruction) name -> category, from the optimised HLO's instruction kinds and op_names.

    A fusion's own op_name may be only its call site, so the op_names of the computation it calls count too.
    """
    op_names: dict[str, list[str]] = collections.defaultdict(list)
    calls: dict[str, str] = {}
    computation = ""
    for line in hlo_text.splitlines():
        header = re.match(r"^(?:ENTRY )?%(\S+) ", line)
        if header:
            computation = header.group(1)
            continue
        instruction = re.match(r"^\s+(?:ROOT )?%(\S+) = .*?op_name=\"([^\"]*)\"", line)
        if instruction:
            op_names[instruction.group(1)].append(instruction.group(2))
            op_names[computation].append(instruction.group(2))
            called = re.search(r"calls=%([\w.\-]+)", line)
            if called:
                calls[instruction.group(1)] = called.group(1)
    return {name: _category(name, names + op_names.get(calls.get(name, ""), []))
            for name, names in op_names.items()}


def _category(kernel: str, op_names: list[str]) -> str:
    if kernel.startswith(("ynn_fusion", "dot", "onednn", "xnn")) or any(n.endswith("dot_general") for n in op_names[:1]):
        return "matmul"
    if kernel.startswith(COLLECTIVES):  # their op_names are the gradients' (e.g. a norm scale's): check first
        return "collectives (gradient all-reduce)"
    if kernel.startswith(("transpose", "copy", "bitcast_copy")):
        return "copies / transposes"
    joined = " ".join(op_names)
    if "(DecoderLM)" not in joined and "(EncoderLM)" not in joined and "Model)" not in joined:
        return "optimizer + clipping"
    for fragment, category in COMPONENT_PATTERNS[:3]:
        if fragment in joined:
            return category
    if "block_" not in joined:
        return "loss"
    return "other elementwise"


def profile_jax(config, chunks: int) -> dict:
    """Steps/s of the recipe's train chunk and the per-category kernel time of `chunks` traced calls."""
    import jax
    from jax._src.profiler import ProfileData

    from llm_jax.training.run import build_run, jit_train_chunk, model_inputs_fn
    from llm_jax.training.state import init_state

    run = build_run(config, tempfile.mkdtemp())
    state = init_state(run.model, run.tx, model_inputs_fn(run.task), 0, run.shardings)
    steps = config.train.steps_per_dispatch
    batches = run.data.train.next_chunk(steps)
    with run.rules_context():
        compiled = jit_train_chunk(run).lower(state, batches).compile()
    for _ in range(3):
        state, metrics = compiled(state, batches)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(chunks):
        state, metrics = compiled(state, batches)
    jax.block_until_ready(metrics)
    step_ms = (time.perf_counter() - start) * 1e3 / (chunks * steps)
    trace_dir = tempfile.mkdtemp()
    jax.profiler.start_trace(trace_dir)
    start = time.perf_counter()
    for _ in range(chunks):
        state, metrics = compiled(state, batches)
    jax.block_until_ready(metrics)
    traced_ms = (time.perf_counter() - start) * 1e3 / (chunks * steps)
    jax.profiler.stop_trace()
    categories = hlo_categories(compiled.as_text())
    busy, threads, kernels = collections.Counter(), set(), 0
    for plane in ProfileData.from_file(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)[0]).planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLAEigen"):
                continue
            for event in line.events:
                if event.name in categories:
                    threads.add(line.name)
                    busy[categories[event.name]] += event.duration_ns / 1e6 / (chunks * steps)
                    kernels += 1
    per_core = {category: ms / len(threads) for category, ms in busy.items()}  # rows add up to the step's wall
    return {"ms_per_step": step_ms, "traced_ms_per_step": traced_ms, "threads": len(threads),
            "kernels_per_step": kernels / (chunks * steps), "busy_ms": per_core,
            "idle_ms": max(0.0, traced_ms - sum(per_core.values()))}


def profile_torch(steps: int) -> dict:
    """Step time of the PyTorch reference and its self CPU time per category (torch.profiler)."""
    import numpy as np
    import torch
    from torch.profiler import ProfilerActivity, profile

    import torch_shakespeare_char as reference

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    train, _, vocab = reference.load_splits(reference.DEFAULT_DATA)
    model = reference.GPT(reference.GPTConfig(vocab_size=vocab))
    optimizer = reference.make_optimizer(model)
    rng = np.random.default_rng(0)

    def step() -> None:
        x, y = reference.sample_batch(train, rng)
        reference.train_step(model, optimizer, x, y, reference.PEAK_LR)

    for _ in range(30):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    step_ms = (time.perf_counter() - start) * 1e3 / steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        traced_ms = (time.perf_counter() - start) * 1e3 / steps
    busy = collections.Counter()
    for event in prof.key_averages():
        if event.key.startswith(("aten::", "Optimizer")) and not event.key.startswith("Optimizer.step"):
            category = next((c for fragment, c in TORCH_PATTERNS if fragment in event.key), "other elementwise")
            busy[category] += event.self_cpu_time_total / 1e3 / steps
    return {"ms_per_step": step_ms, "traced_ms_per_step": traced_ms, "threads": torch.get_num_threads(),
            "busy_ms": dict(busy), "idle_ms": max(0.0, traced_ms - sum(busy.values()))}


def table(results: dict[str, dict]) -> str:
    names = list(results)
    lines = ["| category | " + " | ".join(f"{n} ms/step" for n in names) + " |",
             "| --- |" + " --- |" * len(names)]
    for category in CATEGORIES:
        lines.append(f"| {category} | " + " | ".join(f"{r['busy_ms'].get(category, 0.0):.2f}" for r in results.values())
                     + " |")
    lines.append("| idle + dispatch | " + " | ".join(f"{r['idle_ms']:.2f}" for r in results.values()) + " |")
    lines.append("| **wall (untraced)** | " + " | ".join(f"**{r['ms_per_step']:.2f}**" for r in results.values())
                 + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=10, help="train chunks timed and traced (JAX)")
    parser.add_argument("--no_torch", action="store_true")
    parser.add_argument("--json", default="")
    args, overrides = parser.parse_known_args()
    from experiments.shakespeare_char import get_config

    config = get_config(None)
    for override in overrides:  # --config.section.key=value, parsed like the train CLI's values
        name, value = override.removeprefix("--config.").split("=", 1)
        section, key = name.split(".")
        config[section][key] = json.loads(value) if value[:1] in "[{0123456789-tf" else value
    devices = xla_defaults.split_cpu(config.mesh.cpu_devices, config.train.batch_size,
                                     config.optimizer.grad_accum_steps)  # --config.mesh.cpu_devices=-1: per core
    results = {"jax" if not devices else f"jax, {devices} CPU devices": profile_jax(config, args.chunks)}
    if not args.no_torch:
        results["pytorch"] = profile_torch(args.chunks * config.train.steps_per_dispatch)
    print(f"CPU: {cpu_description()}")
    print(f"XLA_FLAGS: {os.environ.get('XLA_FLAGS', '')}")
    jax_result = next(iter(results.values()))
    print(f"JAX kernels per step: {jax_result['kernels_per_step']:.0f} on {jax_result['threads']} threads")
    print(table(results))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump({"cpu": cpu_description(), "xla_flags": os.environ.get("XLA_FLAGS", ""), **results}, out,
                      indent=1)


if __name__ == "__main__":
    main()
