"""Per-token decode latency with and without the KV cache, and beam-search / batched-sampling throughput.

    python benchmarks/decode_latency.py [--json decode_latency.json] [--positional rope]

A decoder with random weights (4 layers, d_model 256, 4 heads, max_len 1280, vocabulary 256), f32, greedy:
- cached: `llm_jax.decoding.engine` generating N = 64, 256, 1024 tokens after a 16-token prompt (one prefill,
  then one jitted step per token in an on-device loop); per-token time = wall time / N, compile excluded (a
  warm-up call of the same shapes first). The slope is a least-squares fit of the per-token time against
  the mean context length of the run (s per context token; 0 = flat).
- uncached: the reference sampler (`llm_jax.decoding.sampling`), one full forward over the 1280-token window
  per token, as generate did before the engine; per-token time = the mean of 8 calls at each context N.
- throughput: sequences/s of beam search (beam 4) and of sampling (temperature 1) at batch 1 and 16, 64 new
  tokens after a 16-token prompt.
Prints a Markdown table and the CPU, writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # this checkout's llm_jax, wherever the script is started from

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs.model_sizes import apply_model_size  # noqa: E402
from llm_jax import config as config_lib  # noqa: E402
from llm_jax import host_cpu  # noqa: E402
from llm_jax.decoding.engine import DecodeOptions, build_engine  # noqa: E402
from llm_jax.decoding.sampling import lm_logits, make_next_token  # noqa: E402
from llm_jax.models.families import build_model  # noqa: E402
from llm_jax.models.model_config import build_model_config  # noqa: E402

VOCAB, MAX_LEN, PROMPT = 256, 1280, 16
LENGTHS = (64, 256, 1024)


def build(positional: str):
    config = config_lib.default_config()
    apply_model_size(config, "test")
    config.model.update(num_layers=4, d_model=256, num_heads=4, max_len=MAX_LEN, positional=positional)
    model_config = build_model_config(config.model, VOCAB, {"data": 1, "fsdp": 1, "tensor": 1})
    model = build_model(model_config)
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda leaf: jnp.asarray(0.02 * rng.normal(size=leaf.shape), leaf.dtype), shapes)
    return model_config, model, params


def timed(fn, repeats: int = 1) -> float:
    fn()  # compile and warm up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def prompts(batch: int) -> list[list[int]]:
    return np.random.default_rng(batch).integers(0, VOCAB, size=(batch, PROMPT)).tolist()


def cached_latency(engine, params) -> dict[int, float]:
    return {n: timed(lambda: engine.generate(params, prompts(1), DecodeOptions(max_new_tokens=n, temperature=0)))
            / n for n in LENGTHS}


def uncached_latency(model, params) -> dict[int, float]:
    next_token = make_next_token(lm_logits(model), VOCAB, DecodeOptions(temperature=0.0))
    window_1L = np.random.default_rng(0).integers(0, VOCAB, size=(1, MAX_LEN)).astype(np.int32)
    key = jax.random.key(0)
    return {n: timed(lambda: int(next_token(params, window_1L, np.int32(PROMPT + n), key)), repeats=8)
            for n in LENGTHS}


def throughput(engine, params) -> dict[str, float]:
    results = {}
    for batch in (1, 16):
        for name, options in [("beam4", DecodeOptions(max_new_tokens=64, beam_size=4)),
                              ("sample", DecodeOptions(max_new_tokens=64, temperature=1.0))]:
            results[f"{name}_batch{batch}"] = batch / timed(lambda: engine.generate(params, prompts(batch), options))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="decode_latency.json", help="where to write the numbers")
    parser.add_argument("--positional", default="rope", help="model.positional of the benchmarked decoder")
    args = parser.parse_args()
    model_config, model, params = build(args.positional)
    engine = build_engine(model_config)
    cached, uncached = cached_latency(engine, params), uncached_latency(model, params)
    contexts = [PROMPT + n / 2 for n in LENGTHS]  # mean context length while generating n tokens
    slope = float(np.polyfit(contexts, [cached[n] for n in LENGTHS], 1)[0])
    rates = throughput(engine, params)
    print(f"CPU: {host_cpu.describe()}; jax {jax.__version__}, backend {jax.default_backend()}; "
          f"4 layers, d_model 256, max_len {MAX_LEN}, positional {args.positional}, f32, greedy\n")
    print("| generated tokens | cached ms/token | uncached ms/token | speed-up |\n| --- | --- | --- | --- |")
    for n in LENGTHS:
        print(f"| {n} | {cached[n] * 1e3:.2f} | {uncached[n] * 1e3:.2f} | {uncached[n] / cached[n]:.1f}x |")
    print(f"\ncached per-token time against mean context length: slope {slope * 1e6:.3f} us per context token")
    print("\n| decoding (64 new tokens) | batch 1 seq/s | batch 16 seq/s |\n| --- | --- | --- |")
    for name in ("beam4", "sample"):
        print(f"| {name} | {rates[f'{name}_batch1']:.2f} | {rates[f'{name}_batch16']:.2f} |")
    record = {"cpu": host_cpu.describe(), "jax": jax.__version__, "backend": jax.default_backend(),
              "positional": args.positional, "cached_s_per_token": cached, "uncached_s_per_token": uncached,
              "slope_s_per_context_token": slope, "sequences_per_second": rates}
    with open(args.json, "w") as file:
        json.dump(record, file, indent=2)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
