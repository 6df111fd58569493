"""Per-device memory of a ~124M-parameter GPT-2-small-sized config on data / FSDP / tensor meshes,
from compiled executables only (`llm_jax.train --compile_only`): nothing is allocated or trained.

    python benchmarks/memory_table.py [--devices 8]

Runs on a CPU with forced host devices; the numbers are what each device of such a mesh must hold.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# GPT-2 small (configs/model_sizes.py) at 512 tokens with the GPT-2 BPE vocabulary, on each mesh preset
# (configs/meshes.py) of --devices devices
SIZE = "gpt2_small"
MESH_PRESETS = ("data", "fsdp", "data_tensor", "fsdp_tensor", "data_fsdp_tensor")
OVERRIDES = ["--config.data.tokenizer=gpt2_bpe",
             f"--config.data.tokenizer_path={os.path.join(os.path.dirname(REPO), 'shared', 'data', 'gpt2.tiktoken')}",
             "--config.model.max_len=512", "--config.model.positional=learned", "--config.data.seq_len=512",
             "--config.train.batch_size=16", "--config.train.steps_per_dispatch=1"]


def compile_report(mesh: str, devices: int) -> dict:
    """`llm_jax.train --compile_only`'s report for mesh preset `mesh`, and its full-rematerialization warnings."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    with tempfile.TemporaryDirectory() as workdir:
        command = [sys.executable, "-m", "llm_jax.train", f"--config=experiments/python_docs.py:size={SIZE},mesh={mesh}",
                   f"--workdir={workdir}", "--compile_only", *OVERRIDES]
        result = subprocess.run(command, cwd=REPO, env=env, check=True, capture_output=True, text=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    report["full_remat_warnings"] = result.stderr.count("Involuntary full rematerialization")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=8)
    args = parser.parse_args()
    mib = 2 ** 20
    print("| mesh | parameters | params MiB/device | optimizer MiB/device | compiled args MiB | temp MiB | "
          "peak estimate MiB | full remat warnings |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for preset in MESH_PRESETS:
        r = compile_report(preset, args.devices)
        name = " x ".join(f"{axis}={size}" for axis, size in r["mesh"].items() if size > 1) or "single device"
        print(f"| {name} | {r['parameters']:,} | {r['params_bytes_per_device'] / mib:.1f} | "
              f"{r['optimizer_bytes_per_device'] / mib:.1f} | {r['argument_bytes'] / mib:.1f} | "
              f"{r['temp_bytes'] / mib:.1f} | {r['peak_bytes_estimate'] / mib:.1f} | {r['full_remat_warnings']} |",
              flush=True)


if __name__ == "__main__":
    main()
