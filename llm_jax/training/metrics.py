"""Metric sinks for a training run: a JSON-lines file, TensorBoard, and the console.

Only JAX process 0 writes (by default), so multi-host runs produce one copy of each sink.
TensorBoard events are written with the pure-python record writer shipped in the `tensorboard`
package, so TensorFlow is not needed.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import time
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

from llm_jax.errors import MetricsFileError

METRICS_FILENAME = "metrics.jsonl"
TENSORBOARD_DIRNAME = "tensorboard"
_EVENT_FILE = re.compile(r"events\.out\.tfevents\.(\d+)\.")


def _json_value(value: Any) -> int | float | None:
    """Converts a scalar (python, numpy or jax) to a JSON-safe python number; NaN/Inf -> None."""
    item = np.asarray(value).item()
    if isinstance(item, bool):
        return int(item)
    if isinstance(item, int):
        return item
    item = float(item)
    return item if math.isfinite(item) else None


def _new_event_file_path(logdir: str) -> str:
    """A path for a new TensorBoard event file in `logdir` whose name sorts after every event file there.

    TensorBoard loads a directory's event files in name order, and a restart marker only hides the steps it
    replaces if its file is loaded last. Names start with a time in seconds, so two writers within one
    second (or on hosts with skewed clocks) would tie; the time is bumped past the newest existing one.
    """
    os.makedirs(logdir, exist_ok=True)
    earlier = [int(match.group(1)) for match in map(_EVENT_FILE.match, os.listdir(logdir)) if match]
    stamp = max([int(time.time()), *(value + 1 for value in earlier)])
    return os.path.join(logdir, f"events.out.tfevents.{stamp:010d}.{socket.gethostname()}.{os.getpid()}")


def _cut_torn_line(path: str) -> None:
    """Cuts an unterminated last line (a write killed midway) so the next append starts on a line of its own."""
    try:
        with open(path, "rb+") as f:
            if f.seek(0, os.SEEK_END) == 0:
                return
            f.seek(-1, os.SEEK_END)
            if f.read(1) == b"\n":
                return
            f.seek(0)
            keep = f.read().rfind(b"\n") + 1
            logging.warning("%s: dropping a torn last line (the run was killed while writing it)", path)
            f.truncate(keep)
    except FileNotFoundError:
        return


def _checked_fields(fields: Mapping[str, str], record: Mapping[str, Any]) -> dict[str, str]:
    """`fields` once they are strings under names the record does not use (a clash would overwrite a metric)."""
    for name, value in fields.items():
        if name in record or not isinstance(value, str):
            raise ValueError(f"json field {name}={value!r}: give a string under a name that is neither 'step' nor "
                             "a metric")
    return dict(fields)


class MetricsWriter:
    """Writes scalar metrics to DIR/metrics.jsonl and DIR/tensorboard/, only on JAX process 0."""

    def __init__(self, workdir: str, *, enabled: bool | None = None, restart_step: int | None = None):
        """Opens (in append mode, so a resumed run keeps earlier lines) the sinks under `workdir`.

        `enabled` defaults to `jax.process_index() == 0`; when False every method is a no-op
        and nothing is created on disk. `restart_step` is the step a resumed run restarts from (its
        checkpoint's step; -1 when it starts over): TensorBoard then hides the events of earlier writers at
        later steps, which this run writes again. Pair it with `keep_metrics_through(workdir, restart_step)`.
        """
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.jsonl_path = os.path.join(workdir, METRICS_FILENAME)
        self.tensorboard_dir = os.path.join(workdir, TENSORBOARD_DIRNAME)
        self._jsonl = None
        self._events = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        _cut_torn_line(self.jsonl_path)
        self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
        self._events = RecordWriter(open(_new_event_file_path(self.tensorboard_dir), "xb"))
        self._add_event(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
        if restart_step is not None:
            # The event accumulator drops the events it has read with step >= a START event's step.
            start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
            self._add_event(event_pb2.Event(wall_time=time.time(), step=int(restart_step) + 1, session_log=start))

    def _add_event(self, event: event_pb2.Event) -> None:
        """Appends one event to the TensorBoard file and flushes it, so a kill loses at most this event."""
        self._events.write(event.SerializeToString())
        self._events.flush()

    def write(self, step: int, metrics: Mapping[str, float], *,
              json_fields: Mapping[str, str] | None = None) -> None:
        """Appends one JSON line and one TensorBoard scalar per metric at `step`, then flushes both.

        Non-finite values are written as `null` in the JSON line (the key is kept), so the file
        stays strict JSON; TensorBoard receives them as-is. `json_fields` (strings, e.g. {"source": "evaluate"})
        go into the JSON line alone: they tell its writer apart and are no TensorBoard scalars.
        """
        if not self.enabled or self._jsonl is None or self._events is None:
            return
        step = int(step)
        record: dict[str, Any] = {"step": step}
        record.update({name: _json_value(value) for name, value in metrics.items()})
        record.update(_checked_fields(json_fields or {}, record))
        self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        self._jsonl.flush()

        values = [
            summary_pb2.Summary.Value(tag=name, simple_value=float(np.asarray(value).item()))
            for name, value in metrics.items()
        ]
        self._add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary_pb2.Summary(value=values)))

    def close(self) -> None:
        """Flushes and closes both sinks; further calls are no-ops."""
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._events is not None:
            self._events.close()
            self._events = None


def _parse_record(line: bytes) -> dict:
    """One metrics.jsonl line as a dict; ValueError if it is not a JSON object with an integer "step"."""
    record = json.loads(line)
    if not isinstance(record, dict) or not isinstance(record.get("step"), int):
        raise ValueError('not a JSON object with an integer "step"')
    return record


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl file (used by evaluate, resume, reports and tests).

    The last line is ignored, with a warning, when it has no newline or does not parse: a run killed while
    writing it. Any other line that does not parse raises a ValueError naming PATH:LINE, since it means the
    file was edited or corrupted. A missing file raises FileNotFoundError (see `read_run_metrics`).
    """
    with open(path, "rb") as f:
        *complete, tail = f.read().split(b"\n")
    numbered = [(number, line) for number, line in enumerate(complete, start=1) if line.strip()]
    if tail.strip():  # no newline after it: its write was cut short
        logging.warning("%s:%d: ignoring a torn last line (the run was killed while writing it)",
                        path, len(complete) + 1)
    records = []
    for index, (number, line) in enumerate(numbered):
        try:
            records.append(_parse_record(line))
        except ValueError as error:
            if index == len(numbered) - 1 and not tail.strip():
                logging.warning("%s:%d: ignoring an unreadable last line (%s)", path, number, error)
                break
            raise MetricsFileError(f"{path}:{number}: unreadable metrics line ({error}); the file was edited or "
                             "corrupted: fix or delete that line (one JSON object with a \"step\" per line)") from None
    return records


def read_run_metrics(workdir: str) -> list[dict]:
    """The records of WORKDIR/metrics.jsonl as `read_metrics` reads them; [] when the run has none yet."""
    try:
        return read_metrics(os.path.join(workdir, METRICS_FILENAME))
    except FileNotFoundError:
        return []


def _fsync_directory(path: str) -> None:
    """Makes a rename inside `path` durable (the directory entry is only on disk once the directory is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def keep_metrics_through(workdir: str, step: int) -> None:
    """Rewrites WORKDIR/metrics.jsonl with only its records at steps <= `step` (-1 keeps none); a torn last line
    goes too.

    A resumed run calls it with its checkpoint's step, as it writes the later steps again. The new content is
    written to a temporary file, synced and renamed over the old one, so a crash at any point leaves either
    the old or the new file. No-op when the file does not exist.
    """
    path = os.path.join(workdir, METRICS_FILENAME)
    if not os.path.exists(path):
        return
    kept = [record for record in read_metrics(path) if record["step"] <= step]
    temporary = path + ".tmp"  # a fixed name: a copy left by a crash here is overwritten by the next call
    try:
        with open(temporary, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(record) + "\n" for record in kept)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, os.stat(path).st_mode & 0o7777)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    _fsync_directory(workdir)


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
