"""JAX (llm_jax.train) against the PyTorch reference on the shakespeare_char recipe, in one run.

    pip install torch==2.13.0   # benchmark-only; the CPU build these machines hold
    python benchmarks/shakespeare_char_throughput.py [--steps 2000] [--rounds 1] [--json out.json]

Each round trains both implementations for --steps (JAX first, then PyTorch) and prints their final
validation loss over 200 batches and training throughput (tokens/s, compile and evaluation excluded; the
first 100 steps excluded for both, as warm-up). Rounds alternate the two so machine noise hits both.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # this checkout's llm_jax, wherever the script is started from

from llm_jax import host_cpu  # noqa: E402
from llm_jax.training.metrics import METRICS_FILENAME, read_metrics  # noqa: E402


def run_jax(steps: int, eval_batches: int) -> dict:
    with tempfile.TemporaryDirectory() as workdir:
        command = [sys.executable, "-m", "llm_jax.train", "--config=experiments/shakespeare_char.py",
                   f"--workdir={workdir}", f"--config.train.steps={steps}", f"--config.train.eval_steps={eval_batches}"]
        subprocess.run(command, cwd=REPO, check=True, stderr=subprocess.DEVNULL)
        records = read_metrics(os.path.join(workdir, METRICS_FILENAME))
    windows = [r for r in records if "train/tokens_per_second" in r and r["step"] > 100]
    tokens_per_window = [(r["step"] - prev["step"]) * 12 * 64 for prev, r in zip(
        [r for r in records if "train/tokens_per_second" in r], windows)]
    seconds = sum(t / r["train/tokens_per_second"] for t, r in zip(tokens_per_window, windows))
    final_eval = [r["eval/loss"] for r in records if "eval/loss" in r][-1]
    return {"final_val_loss": final_eval, "tokens_per_second": sum(tokens_per_window) / seconds}


def run_torch(steps: int, eval_batches: int) -> dict:
    command = [sys.executable, os.path.join(REPO, "benchmarks", "torch_shakespeare_char.py"), "--steps", str(steps),
               "--eval_batches", str(eval_batches), "--warmup_steps", "100"]
    output = subprocess.run(command, cwd=REPO, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--eval_batches", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--json", default="", help="also write every round's results here")
    args = parser.parse_args()
    print(f"CPU: {host_cpu.describe()}\nXLA_FLAGS (before llm_jax.train adds mesh.cpu_devices): "
          f"{os.environ.get('XLA_FLAGS', '')}\n")
    print("| round | implementation | final val loss | train tokens/s | ms/step |")
    print("| --- | --- | --- | --- | --- |")
    rounds = []
    for round_index in range(args.rounds):
        results = {"jax": run_jax(args.steps, args.eval_batches), "pytorch": run_torch(args.steps, args.eval_batches)}
        for name, result in results.items():
            tps = result["tokens_per_second"]
            print(f"| {round_index} | {name} | {result['final_val_loss']:.4f} | {tps:,.0f} | {768e3 / tps:.1f} |",
                  flush=True)
        rounds.append({**results, "ratio": results["jax"]["tokens_per_second"] /
                       results["pytorch"]["tokens_per_second"]})
    ratios = ", ".join(f"{r['ratio']:.2f}" for r in rounds)
    print(f"\nJAX / PyTorch throughput ratio per round: {ratios}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump({"cpu": host_cpu.describe(), "steps": args.steps, "rounds": rounds}, out, indent=1)


if __name__ == "__main__":
    main()
