"""GPU throughput of llm_jax's real train step: GPT-2 small and a GPT-3 XL-shaped 1.3B decoder in bfloat16 on
synthetic tokens, with model.attention_impl xla and cudnn; prints a table (tokens/s, step time, MFU) and writes
JSON.

    python benchmarks/gpu_decoder.py --out gpu_decoder.json             # on a GPU machine, a few minutes
    python benchmarks/gpu_decoder.py --dry_run --out /tmp/dry.json      # CPU: a tiny model, the same code

Shapes: gpt2_small (12 layers, d_model 768, 12 heads, seq 1024, vocab 50304, batch 16) and gpt_1.3b (GPT-3 XL:
24 layers, d_model 2048, 16 heads of 128, d_ff 8192, seq 2048, vocab 50304, batch 8); both GPT-2 style (learned
positions, LayerNorm, GELU, tied embeddings), parameters float32, compute bfloat16, AdamW. Each (shape, kernel)
compiles once, runs one untimed chunk of --chunk steps (lax.scan, as train.steps_per_dispatch), then
--steps timed steps on one synthetic batch held on the devices (no input pipeline in the timing). MFU =
tokens/s x model FLOPs per token (llm_jax.training.flops: 6 x forward MACs, causal attention counted as the
lower triangle) / (peak bf16 FLOP/s per device x devices), the peak from llm_jax.training.peak_flops's table of
exact device kinds (H100/H200 SXM 989 TFLOP/s dense bf16). A kernel that cannot run
(cudnn on CPU, out of memory) gets a row with its error instead of numbers.

Bringing llm_jax's dependencies to a GPU image that lacks them (this project's H200 image has JAX, Flax, Optax,
Orbax, absl, etils, numpy, protobuf, pyarrow, sentencepiece and tiktoken but not grain, ml-collections or
tensorflow-datasets). On a machine with the package index, in the repository root (Python version of the image;
`--no-deps` because resolving dependencies would also fetch numpy, protobuf and pyarrow, which the image has,
and overflow the device tool's 64 MiB carry limit; the list below is the missing closure, ~11 MB):

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \\
        grain ml-collections tensorflow-datasets array-record dm-tree portpicker immutabledict simple-parsing \\
        docstring-parser tensorflow-metadata googleapis-common-protos termcolor toml importlib-resources
    python3 -m pip wheel --no-deps -w .whl promise    # promise (a tensorflow-datasets need) has no wheel: built here

then on the GPU machine (with the device tool: carry [".whl"]; $OUT is the folder whose files come back):

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site \\
      && python3 benchmarks/gpu_decoder.py --out $OUT/gpu_decoder.json

(`pip install --no-index --find-links .whl grain ml-collections tensorflow-datasets` works too where the image's
site-packages is writable: it resolves against what is installed and fails naming any wheel still missing.)
Not yet run on a GPU: the H200 image has jax 0.11, this code is tested with 0.10.2 on CPU (the dry run).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # this checkout's llm_jax, wherever the script is started from

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from llm_jax import config as config_lib  # noqa: E402
from llm_jax.models.families import build_model  # noqa: E402
from llm_jax.models.model_config import ModelConfig, build_model_config  # noqa: E402
from llm_jax.sharding import batch_shardings, build_mesh, logical_rules, vocab_shard_sizes  # noqa: E402
from llm_jax.tasks import build_task  # noqa: E402
from llm_jax.training.flops import train_flops_per_token  # noqa: E402
from llm_jax.training.optimizer import build_optimizer  # noqa: E402
from llm_jax.training.peak_flops import resolve_peak  # noqa: E402
from llm_jax.training.run import model_inputs_fn  # noqa: E402
from llm_jax.training.state import abstract_params, init_state, state_shardings  # noqa: E402
from llm_jax.training.steps import make_train_chunk, make_train_step  # noqa: E402

VOCAB = 50304
GPT2_STYLE = dict(positional="learned", norm="layernorm", activation="gelu", mlp="standard", use_bias=False,
                  tie_embeddings=True, dropout=0.0, dtype="bfloat16", param_dtype="float32")
SHAPES: dict[str, dict[str, Any]] = {  # model keys, seq_len, batch_size
    "gpt2_small": dict(model=dict(num_layers=12, d_model=768, num_heads=12), seq_len=1024, batch_size=16),
    "gpt_1.3b": dict(model=dict(num_layers=24, d_model=2048, num_heads=16, d_ff=8192), seq_len=2048, batch_size=8),
}
DRY_SHAPE = {"dry_tiny": dict(model=dict(num_layers=2, d_model=64, num_heads=4), seq_len=32, batch_size=8)}


def shape_config(shape: dict[str, Any], impl: str, num_devices: int) -> Any:
    """The experiment config of one benchmark row: a decoder on causal_lm rows without segment ids."""
    config = config_lib.default_config()
    config.model.update(**GPT2_STYLE, **shape["model"], vocab_size=VOCAB, max_len=shape["seq_len"],
                        attention_impl=impl)
    config.data.update(pipeline="windows", seq_len=shape["seq_len"])  # batch keys: inputs, targets, weights
    config.train.update(batch_size=shape["batch_size"] * num_devices)
    config.mesh.update(data=-1, fsdp=1, tensor=1)
    return config


def peak_flops(cfg: ModelConfig) -> float | None:
    """Peak FLOP/s of one device in the compute dtype (llm_jax.training.peak_flops: the exact device-kind table)."""
    return resolve_peak(None, cfg.dtype).flops_per_device


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Model training FLOPs per token (llm_jax.training.flops: 6 x forward MACs, causal attention as causal)."""
    return train_flops_per_token(cfg, seq_len)


def synthetic_batch(spec: dict[str, Any], chunk: int, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """[chunk, batch, ...] random tokens for integer keys, ones for weights."""
    rng = np.random.default_rng(seed)
    batch = {}
    for key, field in spec.items():
        shape = (chunk, batch_size) + field.shape
        integer = np.issubdtype(field.dtype, np.integer)
        batch[key] = rng.integers(0, VOCAB, shape).astype(field.dtype) if integer else np.ones(shape, field.dtype)
    return batch


def build_step(config: Any, steps: int) -> tuple[Any, Any, Any, Any, Any]:
    """(model config, jitted train chunk, initial state, device batch spec shardings, task): what
    llm_jax.training.run builds for a run, without a data pipeline or work directory."""
    devices = jax.devices()
    mesh_sizes = config_lib.validate(config, len(devices))
    task = build_task(config)
    mesh, rules = build_mesh(mesh_sizes, devices), logical_rules(config.mesh)
    cfg = build_model_config(config.model, VOCAB, vocab_shard_sizes(mesh_sizes, rules), task.heads())
    model, inputs = build_model(cfg), model_inputs_fn(task)
    params = nn.unbox(abstract_params(model, inputs))
    tx, schedule = build_optimizer(config.optimizer, steps, params, (), cfg.num_layers)
    with nn.logical_axis_rules(rules):
        shardings = state_shardings(model, tx, inputs, mesh, rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state = init_state(model, tx, inputs, 0, shardings)
    batch_sharding = batch_shardings(mesh, rules, task.batch_spec(), stacked=True)
    step = make_train_step(model, task, tx, schedule, 1, use_dropout=False)
    chunk = jax.jit(make_train_chunk(step), in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None),
                    donate_argnums=0)
    return cfg, chunk, state, batch_sharding, (task, mesh, rules)


def measure(name: str, shape: dict[str, Any], impl: str, steps: int, chunk_steps: int) -> dict[str, Any]:
    """One row: compile, one untimed chunk, then `steps` timed steps (whole chunks)."""
    row = {"shape": name, "attention_impl": impl, "seq_len": shape["seq_len"], "backend": jax.default_backend(),
           "device_kind": jax.devices()[0].device_kind, "devices": jax.device_count()}
    config = shape_config(shape, impl, jax.device_count())
    row["batch_size"] = config.train.batch_size
    cfg, chunk, state, sharding, (task, mesh, rules) = build_step(config, steps + chunk_steps)
    batch = jax.device_put(synthetic_batch(task.batch_spec(), chunk_steps, config.train.batch_size), sharding)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        start = time.perf_counter()
        compiled = chunk.lower(state, batch).compile()
        row["compile_s"] = time.perf_counter() - start
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        chunks = max(1, math.ceil(steps / chunk_steps))
        start = time.perf_counter()
        for _ in range(chunks):
            state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        seconds = time.perf_counter() - start
    timed_steps = chunks * chunk_steps
    tokens_per_second = timed_steps * config.train.batch_size * shape["seq_len"] / seconds
    peak = peak_flops(cfg)
    row.update(steps=timed_steps, step_ms=1e3 * seconds / timed_steps, tokens_per_second=tokens_per_second,
               final_loss=float(np.asarray(metrics["train/loss"])[-1]), flops_per_token=flops_per_token(cfg, shape["seq_len"]),
               peak_flops_per_device=peak, params=sum(x.size for x in jax.tree.leaves(state.params)))
    row["mfu"] = tokens_per_second * row["flops_per_token"] / (peak * jax.device_count()) if peak else None
    return row


def run_row(name: str, shape: dict[str, Any], impl: str, steps: int, chunk_steps: int) -> dict[str, Any]:
    """measure(), or a row with the error (a kernel this backend cannot run, out of memory) so the table goes on."""
    try:
        return measure(name, shape, impl, steps, chunk_steps)
    except Exception as error:  # noqa: BLE001 - reported in the table, the other rows still run
        return {"shape": name, "attention_impl": impl, "backend": jax.default_backend(),
                "error": f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"}


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| shape | attention | params | batch x seq | tokens/s | step ms | MFU | compile s | final loss |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['shape']} | {row['attention_impl']} | {row['error']} |||||||")
            continue
        mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "n/a"
        lines.append(f"| {row['shape']} | {row['attention_impl']} | {row['params'] / 1e6:,.0f}M | "
                     f"{row['batch_size']} x {row['seq_len']} | {row['tokens_per_second']:,.0f} | "
                     f"{row['step_ms']:.1f} | {mfu} | {row['compile_s']:.1f} | {row['final_loss']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry_run", action="store_true", help="a tiny model on any backend (CI: the CPU)")
    parser.add_argument("--shapes", default="", help=f"comma-separated subset of {', '.join(SHAPES)}")
    parser.add_argument("--impls", default="xla,cudnn", help="attention kernels to compare")
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps per row")
    parser.add_argument("--chunk", type=int, default=10, help="steps per device call (lax.scan)")
    parser.add_argument("--out", default="gpu_decoder.json", help="JSON file of the rows")
    args = parser.parse_args(argv)
    shapes = DRY_SHAPE if args.dry_run else {name: SHAPES[name] for name in (args.shapes.split(",") if args.shapes
                                                                             else SHAPES)}
    steps, chunk_steps = (2, 2) if args.dry_run else (args.steps, args.chunk)
    rows = [run_row(name, shape, impl, steps, chunk_steps) for name, shape in shapes.items()
            for impl in args.impls.split(",")]
    print(table(rows))
    with open(args.out, "w") as f:
        json.dump({"rows": rows, "jax": jax.__version__, "argv": sys.argv[1:]}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
