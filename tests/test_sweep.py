"""launch.sweep and launch.report: a real two-run local sweep, skip and resume on re-run, report, dry runs, errors."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ElementTree

import pytest

from conftest import REPO_ROOT, subprocess_env
from launch import report, sweep

FAST = ["--config.train.steps=10", "--config.train.eval_every=5", "--config.train.log_every=5",
        "--config.train.checkpoint_every=5"]
EXPERIMENT = '''
import importlib.util

_spec = importlib.util.spec_from_file_location("_python_docs", {python_docs!r})
_python_docs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_python_docs)


def get_config(arg=None):
    return _python_docs.get_config(arg)


def get_sweep():
    return {sweep!r}
'''
TWO_RATES = [{"optimizer.learning_rate": 1e-3}, {"optimizer.learning_rate": 3e-3}]
NAMES = ["learning_rate=0.001", "learning_rate=0.003"]


def write_experiment(directory, runs: list[dict], name: str = "tiny_sweep.py") -> str:
    """An experiment file: python_docs' config and `runs` as its sweep; returns 'PATH:quick'."""
    path = directory / name
    path.write_text(EXPERIMENT.format(python_docs=str(REPO_ROOT / "experiments" / "python_docs.py"), sweep=runs))
    return f"{path}:quick"


def run_cli(module: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO_ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)


def svg_texts(path) -> list[str]:
    """The text of every <text> element of an SVG written by launch.report (text is kept as text there)."""
    return ["".join(element.itertext()) for element in ElementTree.parse(path).iter("{http://www.w3.org/2000/svg}text")]


def write_metrics(workdir, lines: list[dict]) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def final_eval_loss(workdir) -> float:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    finals = [r for r in records if "eval/loss" in r and r["step"] == 10]
    assert len(finals) == 1, records
    return finals[0]["eval/loss"]


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """A finished local sweep of two learning rates, run two at a time."""
    directory = tmp_path_factory.mktemp("sweep")
    config = write_experiment(directory, TWO_RATES)
    sweep_dir = directory / "runs"
    result = run_cli("launch.sweep", f"--config={config}", f"--sweep_dir={sweep_dir}", "--parallel=2", "--", *FAST)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    return config, sweep_dir, result.stdout


def test_local_sweep_trains_every_run(swept):
    config, sweep_dir, stdout = swept
    record = json.loads((sweep_dir / "sweep.json").read_text())
    assert record["config"] == config and record["variant"] == "quick" and record["backend"] == "local"
    assert record["extra_args"] == FAST
    assert [run["name"] for run in record["runs"]] == NAMES
    assert [run["overrides"] for run in record["runs"]] == TWO_RATES
    for name in NAMES:
        assert f"ok {name}" in stdout
        final_eval_loss(sweep_dir / name)
        saved = json.loads((sweep_dir / name / "config.json").read_text())
        assert saved["config"]["optimizer"]["learning_rate"] == float(name.split("=")[1])
        run_info = json.loads((sweep_dir / name / sweep.RUN_FILE).read_text())
        assert run_info["status"] == "ok" and run_info["returncode"] == 0 and run_info["wall_seconds"] > 0


def test_rerun_skips_finished_runs_and_resumes_the_rest(swept):
    config, sweep_dir, _ = swept
    before = {name: (sweep_dir / name / sweep.RUN_FILE).read_text() for name in NAMES}
    logs = {name: (sweep_dir / name / sweep.LOG_FILE).read_text() for name in NAMES}
    result = run_cli("launch.sweep", f"--config={config}", f"--sweep_dir={sweep_dir}", "--", *FAST)
    assert result.returncode == 0, result.stderr[-3000:]
    assert all(f"skip {name}" in result.stdout for name in NAMES) and "start" not in result.stdout
    assert {name: (sweep_dir / name / sweep.RUN_FILE).read_text() for name in NAMES} == before
    assert {name: (sweep_dir / name / sweep.LOG_FILE).read_text() for name in NAMES} == logs, "no train started"

    shutil.rmtree(sweep_dir / NAMES[1])  # as if the sweep was stopped before the second run
    result = run_cli("launch.sweep", f"--config={config}", f"--sweep_dir={sweep_dir}", "--", *FAST)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert f"skip {NAMES[0]}" in result.stdout and f"start {NAMES[1]}" in result.stdout
    assert f"start {NAMES[0]}" not in result.stdout
    assert (sweep_dir / NAMES[0] / sweep.RUN_FILE).read_text() == before[NAMES[0]]
    final_eval_loss(sweep_dir / NAMES[1])


def test_report_lists_runs_metrics_and_plots(swept):
    _, sweep_dir, _ = swept
    result = run_cli("launch.report", f"--sweep_dir={sweep_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = report.build_report(str(sweep_dir))
    assert [row["name"] for row in rows] == NAMES
    assert [row["optimizer.learning_rate"] for row in rows] == [1e-3, 3e-3]
    for row in rows:
        assert row["eval/loss"] == final_eval_loss(sweep_dir / row["name"])
        assert row["steps"] == 10 and row["status"] == "finished" and row["wall_seconds"] > 0
    markdown = (sweep_dir / "report.md").read_text()
    assert "| name | optimizer.learning_rate | eval/loss | eval/perplexity | eval/token_accuracy | train/loss |" in markdown
    assert all(name in markdown and name in result.stdout for name in NAMES)
    assert f"{rows[0]['eval/loss']:.4f}" in markdown
    with open(sweep_dir / "report.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [row["name"] for row in table] == NAMES
    assert [float(row["eval/loss"]) for row in table] == [row["eval/loss"] for row in rows]
    png = (sweep_dir / "loss_curves.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    assert (sweep_dir / "loss_curves.pdf").read_bytes().startswith(b"%PDF")
    texts = svg_texts(sweep_dir / "loss_curves.svg")
    assert "tiny_sweep:quick: sweep of optimizer.learning_rate (2 runs)" in texts, texts
    assert {"train loss", "validation loss", "training step", "loss (nats per token)"} <= set(texts), texts
    assert "optimizer.learning_rate" in texts and {"learning_rate=0.001", "learning_rate=0.003"} <= set(texts)


def test_report_plots_a_single_final_eval_per_run_as_dots(tmp_path):
    runs = [sweep.Run(name, overrides, str(tmp_path / name)) for name, overrides in zip(NAMES, TWO_RATES)]
    sweep.write_sweep_file(str(tmp_path), sweep.sweep_record("experiments/lr.py", "local", [], runs))
    for index, name in enumerate(NAMES):
        write_metrics(tmp_path / name, [{"step": 5, "train/loss": 3.0 - index}, {"step": 10, "train/loss": 2.5 - index},
                                        {"step": 10, "eval/loss": 2.25 - index}])
    report.plot_loss_curves(str(tmp_path), report.load_sweep(str(tmp_path)), str(tmp_path / "plot"))
    texts = svg_texts(tmp_path / "plot.svg")
    assert "final validation loss at step 10" in texts and "validation loss" not in texts, texts
    assert {"2.250", "1.250", "0.001", "0.003", "learning_rate"} <= set(texts), "dots labelled by value and run"


def test_run_styles_give_a_colour_per_first_key_value_and_a_marker_per_other():
    runs = [{"overrides": {"optimizer.learning_rate": rate, "model.d_model": width}}
            for rate in (3e-3, 1e-3) for width in (64, 128)]
    styles = report.run_styles(runs, ["optimizer.learning_rate", "model.d_model"])
    assert styles[0]["color"] == styles[1]["color"] != styles[2]["color"] == styles[3]["color"]
    assert styles[0]["marker"] == styles[2]["marker"] != styles[1]["marker"] == styles[3]["marker"]
    assert len({style["color"] for style in report.run_styles([{}, {}], [])}) == 2, "one colour per run"


def test_report_marks_runs_without_metrics_missing(tmp_path):
    record = sweep.sweep_record("x.py", "tpu", [], [sweep.Run("a=1", {"model.a": 1}, "remote/a=1")])
    sweep.write_sweep_file(str(tmp_path), record)
    table = report.write_report(str(tmp_path))
    assert report.build_report(str(tmp_path))[0]["status"] == "missing" and "missing" in table
    assert (tmp_path / "loss_curves.png").read_bytes().startswith(b"\x89PNG")
    assert "no run has metrics yet" in svg_texts(tmp_path / "loss_curves.svg")


def test_unknown_key_fails_before_anything_runs(tmp_path):
    config = write_experiment(tmp_path, [{"optimizer.learning_rate": 1e-3}, {"optimizer.learnign_rate": 1}])
    result = run_cli("launch.sweep", f"--config={config}", f"--sweep_dir={tmp_path / 'runs'}", timeout=60)
    assert result.returncode != 0
    assert "optimizer.learnign_rate" in result.stderr and "learnign_rate=1" in result.stderr, result.stderr
    assert not (tmp_path / "runs").exists(), "nothing is written or launched"


def test_bad_values_and_arguments_name_the_problem(tmp_path):
    config = write_experiment(tmp_path, TWO_RATES)
    with pytest.raises(sweep.SweepError, match="train.batch_size=0"):
        sweep.expand_sweep(config, str(tmp_path), ["--config.train.batch_size=0"])
    with pytest.raises(sweep.SweepError, match="train.stepz"):
        sweep.expand_sweep(config, str(tmp_path), ["--config.train.stepz=3"])
    with pytest.raises(sweep.SweepError, match="both swept"):
        sweep.expand_sweep(config, str(tmp_path), ["--config.optimizer.learning_rate=0.1"])
    with pytest.raises(sweep.SweepError, match="no get_sweep"):
        sweep.expand_sweep(str(REPO_ROOT / "experiments" / "python_docs.py:quick"))
    with pytest.raises(sweep.SweepError, match="non-empty list"):
        sweep.expand_sweep(write_experiment(tmp_path, [], "empty.py"))
    with pytest.raises(sweep.SweepError, match="missing.py does not exist"):
        sweep.expand_sweep(str(tmp_path / "missing.py"))


def test_run_names_are_readable_unique_and_filesystem_safe():
    names = sweep.run_names([{"optimizer.learning_rate": 3e-4, "model.d_model": 64},
                             {"data.seed": 1, "train.seed": 2}, {"model.norm": "a/b c"}, {}, {}])
    assert names == ["learning_rate=0.0003,d_model=64", "data.seed=1,train.seed=2", "norm=a_b_c", "base", "base-2"]
    assert sweep.slot_devices(1, 2) == "2,3"


@pytest.mark.parametrize("backend", ["local", "tpu", "slurm"])
def test_dry_run_backends_print_each_runs_command(backend, tmp_path, capsys):
    config = write_experiment(tmp_path, TWO_RATES)
    sweep_dir = str(tmp_path / "runs")
    remote = sweep.RemoteOptions(tpu_name="my-tpu", zone="us-central2-b", repo_dir="/repo", slurm_gpus_per_node=8)
    failed = sweep.run_sweep(config, sweep_dir, backend, FAST, dry_run=True, remote=remote, num_devices=1)
    assert failed == []
    printed = capsys.readouterr().out
    for name, rate in zip(NAMES, ("0.001", "0.003")):
        workdir = os.path.join(sweep_dir, name)
        command = f"--workdir={workdir} {' '.join(FAST)} --config.optimizer.learning_rate={rate}"
        if backend == "slurm":
            script = open(os.path.join(workdir, "job.sbatch")).read()
            assert f"sbatch {workdir}/job.sbatch" in printed and command in script
            assert "#SBATCH --gpus-per-node=8" in script and "cd /repo" in script and "srun --kill-on-bad-exit=1 python" in script
        else:
            assert command in printed
        if backend == "tpu":
            gcloud = "gcloud compute tpus tpu-vm ssh my-tpu --zone=us-central2-b --worker=all --command='cd /repo"
            assert gcloud in printed
    assert not os.path.exists(os.path.join(sweep_dir, NAMES[0], "metrics.jsonl"))
    assert os.path.exists(os.path.join(sweep_dir, sweep.SWEEP_FILE)) == (backend != "local")


def test_only_runs_the_matching_points(tmp_path, capsys):
    config = write_experiment(tmp_path, TWO_RATES)
    sweep_dir = tmp_path / "runs"
    for only in (["learning_rate=3e-3"], ["optimizer.learning_rate=0.003"], [NAMES[1]]):
        assert sweep.run_sweep(config, str(sweep_dir), "tpu", FAST, only=only) == []
        printed = capsys.readouterr().out
        assert f"--workdir={sweep_dir / NAMES[1]}" in printed, (only, printed)
        assert f"--workdir={sweep_dir / NAMES[0]}" not in printed, (only, printed)
    assert [run["name"] for run in json.loads((sweep_dir / "sweep.json").read_text())["runs"]] == NAMES
    sweep.run_sweep(config, str(sweep_dir), "tpu", FAST, only=NAMES)  # repeated --only: either point
    printed = capsys.readouterr().out
    assert all(f"--workdir={sweep_dir / name}" in printed for name in NAMES), printed
    with pytest.raises(sweep.SweepError, match="not a swept key"):
        sweep.run_sweep(config, str(sweep_dir), "tpu", FAST, only=["width=64"])
    result = run_cli("launch.sweep", f"--config={config}", f"--sweep_dir={sweep_dir}", "--dry_run",
                     f"--only={NAMES[0]}", "--only=learning_rate=0.01", "--", *FAST, timeout=120)
    assert result.returncode != 0 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: --only=learning_rate=0.01 matches none of the 2 runs"), result.stderr
