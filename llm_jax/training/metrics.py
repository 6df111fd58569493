"""Metric sinks for a training run: a JSON-lines file, TensorBoard, and the console.

Only JAX process 0 writes (by default), so multi-host runs produce one copy of each sink.
TensorBoard events are written with the pure-python writer shipped in the `tensorboard`
package, so TensorFlow is not needed.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter

METRICS_FILENAME = "metrics.jsonl"
TENSORBOARD_DIRNAME = "tensorboard"


def _json_value(value: Any) -> int | float | None:
    """Converts a scalar (python, numpy or jax) to a JSON-safe python number; NaN/Inf -> None."""
    item = np.asarray(value).item()
    if isinstance(item, bool):
        return int(item)
    if isinstance(item, int):
        return item
    item = float(item)
    return item if math.isfinite(item) else None


class MetricsWriter:
    """Writes scalar metrics to DIR/metrics.jsonl and DIR/tensorboard/, only on JAX process 0."""

    def __init__(self, workdir: str, *, enabled: bool | None = None):
        """Opens (in append mode, so a resumed run keeps earlier lines) the sinks under `workdir`.

        `enabled` defaults to `jax.process_index() == 0`; when False every method is a no-op
        and nothing is created on disk.
        """
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.jsonl_path = os.path.join(workdir, METRICS_FILENAME)
        self.tensorboard_dir = os.path.join(workdir, TENSORBOARD_DIRNAME)
        self._jsonl = None
        self._events = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
        self._events = EventFileWriter(self.tensorboard_dir)

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        """Appends one JSON line and one TensorBoard scalar per metric at `step`, then flushes both.

        Non-finite values are written as `null` in the JSON line (the key is kept), so the file
        stays strict JSON; TensorBoard receives them as-is.
        """
        if not self.enabled or self._jsonl is None or self._events is None:
            return
        step = int(step)
        record: dict[str, Any] = {"step": step}
        record.update({name: _json_value(value) for name, value in metrics.items()})
        self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        self._jsonl.flush()

        values = [
            summary_pb2.Summary.Value(tag=name, simple_value=float(np.asarray(value).item()))
            for name, value in metrics.items()
        ]
        event = event_pb2.Event(
            wall_time=time.time(), step=step, summary=summary_pb2.Summary(value=values)
        )
        self._events.add_event(event)
        self._events.flush()

    def close(self) -> None:
        """Flushes and closes both sinks; further calls are no-ops."""
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._events is not None:
            self._events.close()
            self._events = None


def read_metrics(path: str) -> list[dict]:
    """Reads a metrics.jsonl file back (used by evaluate, reports and tests)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _format_duration(seconds: float) -> str:
    """Formats a duration as 45s / 3m05s / 2h03m."""
    total = max(0, int(round(seconds)))
    if total < 60:
        return f"{total}s"
    minutes, secs = divmod(total, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class ProgressLine:
    """Formats the one-line console progress report.

    The ETA is (total_steps - step) times the seconds per step measured between this
    format() call and the previous one (from their `step` and `train_seconds`); the first
    call, or a call whose step did not advance, shows no ETA.
    """

    def __init__(self, total_steps: int):
        self.total_steps = int(total_steps)
        self._previous: tuple[int, float] | None = None

    def format(self, step: int, metrics: Mapping[str, float], *, train_seconds: float) -> str:
        """Returns e.g. "step   200/2000 | loss 2.1234 | lr 9.87e-04 | 12,345 tok/s | eta 1m23s"."""
        width = len(str(self.total_steps))
        parts = [f"step {step:>{width}d}/{self.total_steps}"]
        if "train/loss" in metrics:
            parts.append(f"loss {float(metrics['train/loss']):.4f}")
        if "train/learning_rate" in metrics:
            parts.append(f"lr {float(metrics['train/learning_rate']):.2e}")
        if "train/tokens_per_second" in metrics:
            parts.append(f"{float(metrics['train/tokens_per_second']):,.0f} tok/s")
        if self._previous is not None:
            prev_step, prev_seconds = self._previous
            if step > prev_step:
                seconds_per_step = (train_seconds - prev_seconds) / (step - prev_step)
                remaining = max(0, self.total_steps - step)
                parts.append(f"eta {_format_duration(remaining * seconds_per_step)}")
        self._previous = (int(step), float(train_seconds))
        return " | ".join(parts)


def log_progress(line: str) -> None:
    """Logs a progress line via absl logging (INFO, to stderr)."""
    logging.info("%s", line)
