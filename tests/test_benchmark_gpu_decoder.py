"""benchmarks/gpu_decoder.py's CPU dry run: the same code path as on a GPU (config, validation, real train
chunk, timing, MFU, table, JSON) on a tiny model; the cudnn row is refused on CPU before anything compiles."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO_ROOT, subprocess_env


def test_dry_run_trains_and_reports_each_kernel(tmp_path):
    out = tmp_path / "rows.json"
    env = {**subprocess_env(), "LLM_JAX_CALIBRATE_PEAK": "0"}
    result = subprocess.run([sys.executable, "benchmarks/gpu_decoder.py", "--dry_run", f"--out={out}"], cwd=REPO_ROOT,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {row["attention_impl"]: row for row in json.loads(out.read_text())["rows"]}
    xla = rows["xla"]
    assert "error" not in xla, xla
    assert xla["steps"] == 2 and xla["tokens_per_second"] > 0 and xla["step_ms"] > 0 and xla["flops_per_token"] > 0
    assert 9.0 < xla["final_loss"] < 12.0  # about log(50304) = 10.8 at init: the synthetic batch trains
    assert "model.attention_impl='cudnn' runs on the gpu backend" in rows["cudnn"]["error"]
    assert "| dry_tiny | xla |" in result.stdout
