"""--profile_steps (a trace of whole dispatches under DIR/profile) and train/mfu of a real CPU run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, metrics, run_module, subprocess_env
from llm_jax.experiment_files import load_experiment
from llm_jax.training import loop
from llm_jax.training.flops import train_flops_per_token
from llm_jax.models.model_config import model_config_from_json
from llm_jax.training.profiling import ProfileStepsError, ProfileWindow

QUICK = ["--config=experiments/shakespeare_char.py:quick", "--config.train.steps=30", "--config.train.log_every=10",
         "--config.train.eval_every=0", "--config.train.checkpoint_every=0", "--config.train.steps_per_dispatch=10"]


@pytest.mark.parametrize("text", ["5:3", "4:4", "-1:4", "a:b", "5", "1:2:3", ""])
def test_bad_windows_are_refused_with_the_flag(text):
    with pytest.raises(ProfileStepsError, match="--profile_steps"):
        ProfileWindow.parse(text)


def test_good_windows_parse():
    assert ProfileWindow.parse("0:1") == ProfileWindow(0, 1)
    assert ProfileWindow.parse(" 20 : 30 ") == ProfileWindow(20, 30)


def test_a_window_after_the_run_fails_before_anything_is_built(tmp_path):
    config = load_experiment("experiments/shakespeare_char.py:quick")
    with pytest.raises(ProfileStepsError, match="train.steps=60"):
        loop.train(config, str(tmp_path / "run"), profile_steps=ProfileWindow(60, 70))
    assert not (tmp_path / "run").exists()


def test_the_cli_refuses_a_bad_window_before_compiling(tmp_path):
    result = run_module("llm_jax.train", *QUICK, f"--workdir={tmp_path / 'run'}", "--profile_steps=5:3", timeout=120)
    assert result.returncode == 1 and "error: --profile_steps=5:3" in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_a_short_run_writes_a_trace_of_whole_dispatches_and_logs_a_calibrated_mfu(tmp_path):
    """Updates 12-15 lie in the dispatch of updates 11-20: that whole dispatch is traced. Calibration is on
    (the suite turns it off elsewhere), its cache in a private directory."""
    workdir, cache = tmp_path / "run", tmp_path / "cache"
    env = {**subprocess_env(), "LLM_JAX_CALIBRATE_PEAK": "1", "LLM_JAX_CACHE_DIR": str(cache)}
    result = subprocess.run([sys.executable, "-m", "llm_jax.train", *QUICK, f"--workdir={workdir}",
                             "--profile_steps=11:15"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "profiled updates 11-20 (from step 10 to step 20)" in result.stderr
    assert list((workdir / "profile").glob("plugins/profile/*/*.xplane.pb")), "TensorBoard's profile plugin reads these"
    assert list((workdir / "profile").glob("plugins/profile/*/perfetto_trace.json.gz"))

    record = json.loads((workdir / "config.json").read_text())
    peak = record["provenance"]["peak_flops"]
    assert peak["source"] == "calibrated" and peak["dtype"] == "float32" and peak["flops_per_device"] > 1e8
    assert str(cache) in peak["note"] and (cache / "peak_flops.json").exists()
    model_config = model_config_from_json(record["model_config"])
    per_token = train_flops_per_token(model_config, record["config"]["data"]["seq_len"])
    logged = [r for r in metrics(workdir) if "train/loss" in r]
    assert [r["step"] for r in logged] == [10, 20, 30]
    for r in logged:
        assert r["train/mfu"] == pytest.approx(r["train/tokens_per_second"] * per_token / peak["flops_per_device"])
        assert 0 < r["train/mfu"] < 1.5
