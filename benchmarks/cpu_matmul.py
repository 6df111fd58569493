"""Matmul GFLOP/s of XLA:CPU (through JAX) and PyTorch on the shakespeare_char recipe's shapes, in one run.

    python benchmarks/cpu_matmul.py [--dtype float32|bfloat16] [--threads 2]

The recipe's train step is a few dozen small matmuls ([768 tokens, 128] x [128, 128 | 384 | 512] forward,
and their transposes in the backward pass); how fast each library runs exactly these shapes bounds how fast
its whole step can be. JAX times a jitted function of 8 independent matmuls (one dispatch, the kernels
XLA picks under this process's XLA_FLAGS); PyTorch times `a @ b` with --threads intra-op threads. Prints a
Markdown table with the CPU model and flags.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from llm_jax import host_cpu  # noqa: E402  (importing llm_jax applies its XLA defaults)

# (m, k, n) of the recipe's forward and backward matmuls at batch 12 x 64 tokens, d_model 128
SHAPES = ((768, 128, 128), (768, 128, 384), (768, 128, 512), (768, 512, 128), (128, 768, 512), (512, 768, 128),
          (128, 768, 128))
REPEATS = 8


def jax_gflops(m: int, k: int, n: int, dtype: str, calls: int) -> float:
    import jax

    keys = jax.random.split(jax.random.key(0), 2 * REPEATS)
    a = [jax.random.normal(keys[i], (m, k), dtype) for i in range(REPEATS)]
    b = [jax.random.normal(keys[REPEATS + i], (k, n), dtype) for i in range(REPEATS)]
    matmuls = jax.jit(lambda a, b: [x @ y for x, y in zip(a, b)])
    jax.block_until_ready(matmuls(a, b))
    start = time.perf_counter()
    for _ in range(calls):
        out = matmuls(a, b)
    jax.block_until_ready(out)
    return 2 * m * k * n * REPEATS * calls / (time.perf_counter() - start) / 1e9


def torch_gflops(m: int, k: int, n: int, dtype: str, calls: int) -> float:
    import torch

    a, b = torch.randn(m, k, dtype=getattr(torch, dtype)), torch.randn(k, n, dtype=getattr(torch, dtype))
    for _ in range(10):
        a @ b
    start = time.perf_counter()
    for _ in range(calls * REPEATS):
        a @ b
    return 2 * m * k * n * REPEATS * calls / (time.perf_counter() - start) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="PyTorch intra-op threads")
    parser.add_argument("--calls", type=int, default=100)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    print(f"CPU: {host_cpu.describe()}\nXLA_FLAGS: {os.environ.get('XLA_FLAGS', '')}\ndtype: {args.dtype}, "
          f"PyTorch {torch.__version__} with {args.threads} threads\n")
    print("| m x k x n | JAX GFLOP/s | PyTorch GFLOP/s | JAX / PyTorch |")
    print("| --- | --- | --- | --- |")
    flops = jax_seconds = torch_seconds = 0.0
    for m, k, n in SHAPES:
        ours, theirs = jax_gflops(m, k, n, args.dtype, args.calls), torch_gflops(m, k, n, args.dtype, args.calls)
        flops += 2 * m * k * n
        jax_seconds, torch_seconds = jax_seconds + 2 * m * k * n / ours, torch_seconds + 2 * m * k * n / theirs
        print(f"| {m} x {k} x {n} | {ours:.0f} | {theirs:.0f} | {ours / theirs:.2f} |")
    print(f"| **all shapes** | **{flops / jax_seconds:.0f}** | **{flops / torch_seconds:.0f}** | "
          f"**{torch_seconds / jax_seconds:.2f}** |")


if __name__ == "__main__":
    main()
