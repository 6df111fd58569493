"""Tests for llm_jax.training.metrics: JSON-lines + TensorBoard sinks and the progress line."""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from llm_jax.training import metrics as metrics_lib


def _strict_loads(line: str) -> dict:
    """json.loads that rejects NaN / Infinity literals (i.e. only accepts standard JSON)."""

    def reject(constant: str):
        raise ValueError(f"non-standard JSON constant {constant!r}")

    return json.loads(line, parse_constant=reject)


def test_write_appends_one_line_per_step(tmp_path):
    writer = metrics_lib.MetricsWriter(str(tmp_path), enabled=True)
    writer.write(10, {"train/loss": 2.5, "train/learning_rate": np.float32(1e-3)})
    writer.write(20, {"train/loss": 2.25, "train/learning_rate": 5e-4})
    # Flushed after each write: readable before close().
    path = tmp_path / "metrics.jsonl"
    assert len(path.read_text().splitlines()) == 2
    writer.close()

    lines = path.read_text().splitlines()
    records = [_strict_loads(line) for line in lines]
    assert records[0] == {"step": 10, "train/loss": 2.5, "train/learning_rate": pytest.approx(1e-3)}
    assert records[1] == {"step": 20, "train/loss": 2.25, "train/learning_rate": 5e-4}
    assert isinstance(records[0]["step"], int)
    assert metrics_lib.read_metrics(str(path)) == records


def test_reopening_appends_instead_of_truncating(tmp_path):
    first = metrics_lib.MetricsWriter(str(tmp_path), enabled=True)
    first.write(10, {"train/loss": 3.0})
    first.close()
    resumed = metrics_lib.MetricsWriter(str(tmp_path), enabled=True)
    resumed.write(20, {"train/loss": 2.0})
    resumed.close()

    records = metrics_lib.read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in records] == [10, 20]
    assert [r["train/loss"] for r in records] == [3.0, 2.0]


def test_non_finite_values_become_null(tmp_path):
    writer = metrics_lib.MetricsWriter(str(tmp_path), enabled=True)
    writer.write(5, {"train/loss": float("nan"), "train/grad_norm": np.float32(np.inf), "ok": 1.0})
    writer.close()

    (line,) = (tmp_path / "metrics.jsonl").read_text().splitlines()
    record = _strict_loads(line)
    assert record == {"step": 5, "train/loss": None, "train/grad_norm": None, "ok": 1.0}


def test_tensorboard_scalars_round_trip(tmp_path):
    writer = metrics_lib.MetricsWriter(str(tmp_path), enabled=True)
    writer.write(10, {"train/loss": 2.5, "eval/loss": 2.75})
    writer.write(20, {"train/loss": 1.1})
    writer.close()

    tb_dir = tmp_path / "tensorboard"
    assert glob.glob(str(tb_dir / "events.out.tfevents.*"))
    accumulator = event_accumulator.EventAccumulator(
        str(tb_dir), size_guidance={event_accumulator.SCALARS: 0}
    )
    accumulator.Reload()
    assert sorted(accumulator.Tags()["scalars"]) == ["eval/loss", "train/loss"]
    train = accumulator.Scalars("train/loss")
    assert [e.step for e in train] == [10, 20]
    np.testing.assert_allclose([e.value for e in train], [2.5, 1.1], rtol=1e-6)
    evals = accumulator.Scalars("eval/loss")
    assert [(e.step, e.value) for e in evals] == [(10, 2.75)]


def test_disabled_writer_creates_nothing(tmp_path):
    workdir = tmp_path / "run"
    writer = metrics_lib.MetricsWriter(str(workdir), enabled=False)
    writer.write(1, {"train/loss": 1.0})
    writer.close()
    assert not workdir.exists()


def test_enabled_defaults_to_process_zero(tmp_path):
    # Single-process test run: jax.process_index() == 0, so the writer is enabled.
    writer = metrics_lib.MetricsWriter(str(tmp_path))
    writer.write(1, {"train/loss": 1.0})
    writer.close()
    assert os.path.exists(tmp_path / "metrics.jsonl")


def test_progress_line_fields_and_eta():
    progress = metrics_lib.ProgressLine(total_steps=1000)
    metrics = {
        "train/loss": 2.123456,
        "train/learning_rate": 9.87e-4,
        "train/tokens_per_second": 12345.4,
    }
    first = progress.format(100, metrics, train_seconds=50.0)
    assert first == "step  100/1000 | loss 2.1235 | lr 9.87e-04 | 12,345 tok/s"
    assert "eta" not in first

    # 100 steps in 10 s -> 0.1 s/step, 800 steps left -> 80 s.
    second = progress.format(200, metrics, train_seconds=60.0)
    assert second == "step  200/1000 | loss 2.1235 | lr 9.87e-04 | 12,345 tok/s | eta 1m20s"


def test_progress_line_omits_missing_keys_and_uses_latest_interval():
    progress = metrics_lib.ProgressLine(total_steps=10_000)
    assert progress.format(0, {}, train_seconds=0.0) == "step     0/10000"
    progress.format(1000, {}, train_seconds=10.0)
    # Last interval: 1000 steps in 1000 s -> 1 s/step, 8000 steps left -> 2h13m20s.
    line = progress.format(2000, {"train/loss": 1.0}, train_seconds=1010.0)
    assert line == "step  2000/10000 | loss 1.0000 | eta 2h13m"


@pytest.mark.parametrize(
    "seconds, expected",
    [(0, "0s"), (45, "45s"), (185, "3m05s"), (3600, "1h00m"), (7380, "2h03m")],
)
def test_eta_formatting(seconds, expected):
    progress = metrics_lib.ProgressLine(total_steps=seconds + 1)
    progress.format(0, {}, train_seconds=0.0)
    line = progress.format(1, {}, train_seconds=1.0)
    assert line.endswith(f"| eta {expected}")


def test_log_progress_uses_absl_info(monkeypatch):
    logged = []
    monkeypatch.setattr(metrics_lib.logging, "info", lambda fmt, *args: logged.append(fmt % args))
    metrics_lib.log_progress("step 1/2 | loss 1.0000")
    assert logged == ["step 1/2 | loss 1.0000"]


def _write_lines(path, text: str) -> None:
    path.write_bytes(text.encode())


@pytest.mark.parametrize(
    "last_line",
    ['{"step": 3, "train/lo', '{"step": 3, "train/loss": 1.0}', "\0\0\0\n"],
    ids=["cut-mid-record", "cut-before-newline", "garbage-after-power-loss"],
)
def test_read_metrics_ignores_a_torn_last_line(tmp_path, monkeypatch, last_line):
    warnings = []
    monkeypatch.setattr(metrics_lib.logging, "warning", lambda fmt, *args: warnings.append(fmt % args))
    path = tmp_path / "metrics.jsonl"
    _write_lines(path, '{"step": 1, "train/loss": 3.0}\n{"step": 2, "train/loss": 2.0}\n' + last_line)

    assert metrics_lib.read_metrics(str(path)) == [{"step": 1, "train/loss": 3.0}, {"step": 2, "train/loss": 2.0}]
    assert len(warnings) == 1 and f"{path}:3" in warnings[0]


def test_read_metrics_rejects_a_corrupt_middle_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write_lines(path, '{"step": 1}\n{"step": 2, "train/lo\n{"step": 3}\n')
    with pytest.raises(ValueError, match=rf"{path}:2: .*fix or delete that line"):
        metrics_lib.read_metrics(str(path))


def test_read_run_metrics_of_a_run_without_metrics_is_empty(tmp_path):
    assert metrics_lib.read_run_metrics(str(tmp_path)) == []
    with pytest.raises(FileNotFoundError):
        metrics_lib.read_metrics(str(tmp_path / "metrics.jsonl"))


def test_writer_cuts_a_torn_line_before_appending(tmp_path):
    _write_lines(tmp_path / "metrics.jsonl", '{"step": 1, "train/loss": 3.0}\n{"step": 2, "train/lo')
    writer = metrics_lib.MetricsWriter(str(tmp_path), enabled=True)
    writer.write(2, {"train/loss": 2.0})
    writer.close()
    assert metrics_lib.read_run_metrics(str(tmp_path)) == [
        {"step": 1, "train/loss": 3.0}, {"step": 2, "train/loss": 2.0}]


@pytest.mark.parametrize("step, kept", [(5, [0, 5, 5]), (-1, []), (100, [0, 5, 5, 10])])
def test_keep_metrics_through_keeps_the_steps_up_to_it(tmp_path, step, kept):
    lines = [{"step": 0, "data": 1}, {"step": 5, "train/loss": 2.0}, {"step": 5, "eval/loss": None},
             {"step": 10, "train/loss": 1.0}]
    _write_lines(tmp_path / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in lines) + '{"step": 11, "tr')

    metrics_lib.keep_metrics_through(str(tmp_path), step)

    text = (tmp_path / "metrics.jsonl").read_text()
    assert text == "".join(json.dumps(r) + "\n" for r in lines if r["step"] <= step)
    assert [r["step"] for r in metrics_lib.read_run_metrics(str(tmp_path))] == kept
    assert os.listdir(tmp_path) == ["metrics.jsonl"]


def test_keep_metrics_through_without_a_file_creates_none(tmp_path):
    metrics_lib.keep_metrics_through(str(tmp_path), 5)
    assert os.listdir(tmp_path) == []


def test_keep_metrics_through_syncs_then_renames(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    original = b'{"step": 1}\n{"step": 2}\n'
    path.write_bytes(original)
    calls = []
    real_fsync = os.fsync
    monkeypatch.setattr(metrics_lib.os, "fsync", lambda fd: calls.append("fsync") or real_fsync(fd))

    def crash(src, dst):
        calls.append("replace")
        assert open(src, "rb").read() == b'{"step": 1}\n'  # complete and synced before the rename
        raise OSError("killed")

    monkeypatch.setattr(metrics_lib.os, "replace", crash)
    with pytest.raises(OSError, match="killed"):
        metrics_lib.keep_metrics_through(str(tmp_path), 1)
    assert calls == ["fsync", "replace"]
    assert path.read_bytes() == original
    assert os.listdir(tmp_path) == ["metrics.jsonl"]


def test_restart_hides_the_replaced_steps_in_tensorboard(tmp_path, monkeypatch):
    # Both writers start within the same second: the second file must still be loaded last.
    monkeypatch.setattr(metrics_lib.time, "time", lambda: 1_700_000_000.5)
    first = metrics_lib.MetricsWriter(str(tmp_path), enabled=True)
    for step in range(1, 11):
        first.write(step, {"train/loss": float(step)})
    first.close()
    resumed = metrics_lib.MetricsWriter(str(tmp_path), enabled=True, restart_step=5)
    for step in range(6, 9):
        resumed.write(step, {"train/loss": 100.0 + step})
    resumed.close()

    accumulator = event_accumulator.EventAccumulator(
        str(tmp_path / "tensorboard"), size_guidance={event_accumulator.SCALARS: 0}
    )
    accumulator.Reload()
    scalars = [(e.step, e.value) for e in accumulator.Scalars("train/loss")]
    assert scalars == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 5.0), (6, 106.0), (7, 107.0), (8, 108.0)]
