"""launch.report's metric columns and scaling-law fits, on sweeps written here (no training), and the scaling
experiment's configs."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT, subprocess_env
from launch import report, scaling_fit, sweep
from llm_jax.config import default_config
from llm_jax.models.model_config import build_model_config
from llm_jax.training import flops, run_record

CLASSIFIER_LINES = [{"step": 0, "data/vocab_size": 512},
                    {"step": 10, "train/loss": 0.7, "train/learning_rate": 1e-4, "train/grad_norm": 1.0,
                     "train/tokens_per_second": 1e4, "train/mfu": 0.1},
                    {"step": 10, "eval/loss": 0.6, "eval/accuracy": 0.8, "eval/f1": 0.75, "eval/examples": 64.0}]
LAW = (1.6, 30.0, 0.3)  # E, A, alpha of the synthetic sweeps
WIDTHS = (16, 24, 32, 48, 64, 96)


def write_sweep(directory, overrides: list[dict], name: str = "experiments/x.py") -> list[str]:
    """sweep.json of runs with `overrides`; returns their names."""
    runs = [sweep.Run(run_name, values, str(directory / run_name))
            for run_name, values in zip(sweep.run_names(overrides), overrides)]
    sweep.write_sweep_file(str(directory), sweep.sweep_record(name, "local", [], runs))
    return [run.name for run in runs]


def write_run(workdir, lines: list[dict], d_model: int = 32, steps: int = 10) -> None:
    """A finished run without training: config.json (a 2-layer decoder of width d_model) and metrics.jsonl."""
    config = default_config()
    config.model.update(num_layers=2, num_heads=2, d_model=d_model)
    config.data.update(seq_len=32)
    config.train.update(steps=steps, batch_size=4)
    model_config = build_model_config(config.model, 65, {})
    run_record.write_first_start(str(workdir), config, model_config, {})
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def law(n: float) -> float:
    E, A, alpha = LAW
    return E + A * n ** (-alpha)


def scaling_sweep(directory, widths=WIDTHS, noise: float = 0.002) -> list[str]:
    """A finished sweep over widths whose final eval/loss follows LAW in the non-embedding count, with noise."""
    names = write_sweep(directory, [{"model.d_model": width} for width in widths], "experiments/scaling.py")
    noises = np.random.default_rng(0).normal(0.0, noise, len(widths))
    for name, width, eps in zip(names, widths, noises):
        loss = law(24 * width * width) + eps
        write_run(directory / name, [{"step": 10, "train/loss": loss + 0.1},
                                     {"step": 10, "eval/loss": loss, "eval/token_accuracy": 0.5}], d_model=width)
    return names


# ----------------------------------------------------------------------------- metric columns


def test_default_metrics_put_eval_first_and_leave_bookkeeping_out():
    available = ["train/loss", "train/learning_rate", "eval/f1", "eval/accuracy", "eval/loss", "eval/examples",
                 "data/vocab_size", "eval_test/accuracy", "eval_test/loss", "train/z_loss", "train/tokens_per_second"]
    assert report.default_metrics(available) == ["eval/loss", "eval/accuracy", "eval/f1", "eval_test/loss",
                                                 "eval_test/accuracy", "train/loss", "train/z_loss"]


def test_report_columns_are_the_runs_own_metrics(tmp_path):
    names = write_sweep(tmp_path, [{"optimizer.learning_rate": 1e-4}, {"optimizer.learning_rate": 3e-4}])
    for index, name in enumerate(names):
        lines = [dict(line) for line in CLASSIFIER_LINES]
        lines[-1]["eval/accuracy"] += index / 10
        write_run(tmp_path / name, lines)
    rows = report.build_report(str(tmp_path))
    metrics = [column for column in rows[0] if "/" in column]
    assert metrics == ["eval/loss", "eval/accuracy", "eval/f1", "train/loss"]
    assert [row["eval/accuracy"] for row in rows] == [0.8, 0.9] and rows[0]["status"] == "finished"
    table = report.write_report(str(tmp_path), ["eval/accuracy", "train/learning_rate"])
    assert "| name | optimizer.learning_rate | eval/accuracy | train/learning_rate | steps |" in table
    assert "| 0.9000 | 0.0001 |" in table, table
    assert "eval/accuracy,train/learning_rate" in (tmp_path / "report.csv").read_text()


def test_unknown_metric_lists_the_metrics_the_runs_have(tmp_path):
    [name] = write_sweep(tmp_path, [{"optimizer.learning_rate": 1e-4}])
    write_run(tmp_path / name, CLASSIFIER_LINES)
    with pytest.raises(sweep.SweepError, match=r"no run logged eval/acuracy; the runs have: eval/loss, "
                                               r"eval/accuracy, eval/examples, eval/f1, train/loss"):
        report.build_report(str(tmp_path), ["eval/acuracy"])


# ----------------------------------------------------------------------------- the fit itself


@pytest.mark.parametrize("E, A, alpha", [(1.6, 30.0, 0.3), (2.0, 1e3, 0.5), (0.5, 5.0, 0.08)])
def test_fit_recovers_a_known_law_within_its_uncertainty(E, A, alpha):
    n = np.geomspace(1e4, 1e7, 8)
    y = E + A * n ** (-alpha) + np.random.default_rng(1).normal(0.0, 1e-3, len(n))
    fit = scaling_fit.fit_power_law(n, y)
    for value, error, truth in ((fit.E, fit.E_err, E), (fit.A, fit.A_err, A), (fit.alpha, fit.alpha_err, alpha)):
        assert 0 < error < 0.2 * abs(truth) and abs(value - truth) < 4 * error, (fit, truth)
    assert fit.rms_residual < 2e-3 and not fit.note
    assert np.allclose(fit.predict(n), np.asarray(y) - np.asarray(fit.residuals))


def test_fit_is_exact_without_noise_whatever_the_scale_of_x():
    n = np.geomspace(1e12, 1e16, 5)  # FLOPs
    fit = scaling_fit.fit_power_law(n, 2.5 + 400.0 * n ** (-0.15))
    assert (fit.E, fit.A, fit.alpha) == pytest.approx((2.5, 400.0, 0.15), rel=1e-4)


@pytest.mark.parametrize("x, y, match", [
    ([1e4, 2e4, 4e4], [3.0, 2.5, 2.2], "at least 4 runs"),
    ([1e4, 1e4, 2e4, 2e4], [3.0, 2.9, 2.5, 2.4], "at least 3 distinct x"),
    ([0.0, 1e4, 2e4, 4e4], [3.0, 2.9, 2.5, 2.4], "positive finite x"),
    ([1e3, 1e4, 2e4, 4e4], [3.0, math.nan, 2.5, 2.4], "finite y")])
def test_fit_refuses_points_it_cannot_fit(x, y, match):
    with pytest.raises(scaling_fit.FitError, match=match):
        scaling_fit.fit_power_law(x, y)


def test_fit_warns_when_the_points_are_no_power_law():
    fit = scaling_fit.fit_power_law([1e4, 2e4, 4e4, 8e4], [2.0, 2.1, 2.2, 2.3])  # rising: alpha hits the range
    assert "edge of the searched range" in fit.note


def test_value_with_error_keeps_two_significant_digits_of_the_error():
    assert scaling_fit.format_value_with_error(0.34512, 0.0213) == "0.345 ± 0.021"
    assert scaling_fit.format_value_with_error(41.88, 2.09) == "41.9 ± 2.1"
    assert scaling_fit.format_value_with_error(3.2e7, 1e6) == "3.200e+07 ± 1.00e+06"


# ----------------------------------------------------------------------------- fits of sweeps


def test_report_fits_params_and_writes_the_plot(tmp_path):
    names = scaling_sweep(tmp_path)
    text = report.write_report(str(tmp_path), fit="params")
    markdown = (tmp_path / "report.md").read_text()
    assert "## Scaling fit: eval/loss = E + A * N^(-alpha), N = non-embedding parameters" in markdown
    assert text.endswith(markdown[markdown.index("## Scaling fit"):])
    alpha_line = next(line for line in markdown.splitlines() if line.startswith("- alpha = "))
    alpha, error = (float(part) for part in alpha_line[len("- alpha = "):].split(" ± "))
    assert abs(alpha - LAW[2]) < max(4 * error, 0.02), alpha_line
    assert all(f"| {name} | {24 * width * width:.4g} |" in markdown for name, width in zip(names, WIDTHS))
    png = (tmp_path / "scaling_fit_params.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and 10_000 < len(png) < 200_000


def test_fit_axes_read_the_saved_model_config(tmp_path):
    write_run(tmp_path, [], d_model=48, steps=10)
    config, model_config = run_record.read_run_config(str(tmp_path))
    assert scaling_fit.FIT_AXES.get("params").read(str(tmp_path)) == 2 * 12 * 48 * 48
    tokens = 10 * 4 * 32  # steps x batch x seq_len
    expected = flops.train_flops_per_token(model_config, 32) * tokens
    assert scaling_fit.FIT_AXES.get("flops").read(str(tmp_path)) == pytest.approx(expected)


def test_fit_over_flops_uses_only_finished_runs_and_needs_four(tmp_path):
    names = scaling_sweep(tmp_path, widths=(16, 32, 64, 96))
    (tmp_path / names[-1] / "metrics.jsonl").write_text(json.dumps({"step": 5, "eval/loss": 2.0}) + "\n")
    with pytest.raises(sweep.SweepError, match=r"at least 4 runs.*got 3.*1 of the 4 runs .* have not finished"):
        report.write_report(str(tmp_path), fit="flops")
    assert not (tmp_path / "report.md").exists(), "nothing written when the fit cannot be made"
    with pytest.raises(sweep.SweepError, match="--fit_metric: no run logged eval/mlm_loss"):
        report.write_report(str(tmp_path), fit="params", fit_metric="eval/mlm_loss")
    with pytest.raises(sweep.SweepError, match="choose one of flops, params"):
        report.write_report(str(tmp_path), fit="width")


def test_command_line_takes_the_sweep_dir_positionally_and_fits(tmp_path):
    scaling_sweep(tmp_path)
    command = [sys.executable, "-m", "launch.report", str(tmp_path), "--fit=params", "--metrics=eval/loss"]
    result = subprocess.run(command, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| name | model.d_model | eval/loss | steps |" in result.stdout and "- alpha = " in result.stdout
    assert "scaling_fit_params.png" in result.stdout
    result = subprocess.run([*command[:4], "--metrics=eval/acc"], cwd=REPO_ROOT, env=subprocess_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and result.stderr.startswith("error: --metrics: no run logged eval/acc; the runs "
                                                               "have: eval/loss, eval/token_accuracy, train/loss")


# ----------------------------------------------------------------------------- the scaling experiment


def _experiment():
    spec = importlib.util.spec_from_file_location("scaling_shakespeare", REPO_ROOT / "experiments" /
                                                  "scaling_shakespeare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_scaling_experiment_builds_and_validates_every_size():
    experiment = _experiment()
    runs = sweep.expand_sweep(str(REPO_ROOT / "experiments" / "scaling_shakespeare.py"))
    assert len(runs) == len(experiment.WIDTHS) >= 5
    for run, width in zip(runs, experiment.WIDTHS):
        config = sweep.build_run_config(experiment, None, run.overrides, [], run.name)
        assert config.model.d_model == width and config.model.num_layers == experiment.NUM_LAYERS
        tokens = run.steps * config.train.batch_size * config.data.seq_len
        params = experiment.non_embedding_params(width)
        assert experiment.TOKENS_PER_PARAM <= tokens / params < experiment.TOKENS_PER_PARAM + 1, run.name
        model_config = build_model_config(config.model, 65, {})
        assert scaling_fit.non_embedding_params(model_config) == params, "the fit's count is the experiment's"
