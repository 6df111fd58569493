"""Summarises a sweep made by `launch.sweep`: a Markdown table, a CSV and the loss curves of every run.

    python -m launch.report --sweep_dir=runs/sweep

Reads SWEEP_DIR/sweep.json and each run's metrics.jsonl and sweep_run.json; writes SWEEP_DIR/report.md,
SWEEP_DIR/report.csv and SWEEP_DIR/loss_curves.png, and prints the table. Runs without metrics are "missing".
"""

from __future__ import annotations

import csv
import json
import logging
import os
from typing import Any, Sequence

from absl import app, flags

from launch.sweep import RUN_FILE, SWEEP_FILE, SweepError, format_value, is_finished, read_metrics

METRIC_COLUMNS = ("train/loss", "eval/loss", "eval/perplexity")


def load_sweep(sweep_dir: str) -> dict:
    """SWEEP_DIR/sweep.json, with an error that says how to make it."""
    path = os.path.join(sweep_dir, SWEEP_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            sweep = json.load(f)
    except FileNotFoundError:
        raise SweepError(f"{path} does not exist; run `python -m launch.sweep --sweep_dir={sweep_dir} ...` "
                         "first") from None
    except ValueError as error:
        raise SweepError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(sweep, dict) or not isinstance(sweep.get("runs"), list):
        raise SweepError(f"{path} has no list of runs; it was not written by launch.sweep")
    return sweep


def override_keys(sweep: dict) -> list[str]:
    """Every swept key, in order of first appearance."""
    return list(dict.fromkeys(key for run in sweep["runs"] for key in run.get("overrides", {})))


def _last(records: Sequence[dict], key: str) -> dict | None:
    """The last record that holds `key`."""
    return next((record for record in reversed(records) if key in record), None)


def _status(workdir: str, records: Sequence[dict], run_info: dict | None) -> str:
    """finished (final eval logged), missing (no metrics) or incomplete, with the last attempt's failure if any."""
    if records and is_finished(workdir):
        return "finished"
    status = "incomplete" if records else "missing"
    if run_info and run_info.get("status") not in (None, "ok"):
        return f"{status} ({run_info['status']}, exit {run_info.get('returncode')})"
    return status


def _read_run_info(workdir: str) -> dict | None:
    try:
        with open(os.path.join(workdir, RUN_FILE), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def report_row(sweep_dir: str, run: dict, keys: Sequence[str]) -> dict[str, Any]:
    """One table row: name, the run's override values, final metrics, steps, wall seconds and status."""
    workdir = os.path.join(sweep_dir, run["name"])
    records, info = read_metrics(workdir), _read_run_info(workdir)
    row: dict[str, Any] = {"name": run["name"]}
    row.update({key: run.get("overrides", {}).get(key) for key in keys})
    train, evaluation = _last(records, "train/loss"), _last(records, "eval/loss")
    row["train/loss"] = train["train/loss"] if train else None
    row["eval/loss"] = evaluation["eval/loss"] if evaluation else None
    row["eval/perplexity"] = evaluation.get("eval/perplexity") if evaluation else None
    row["steps"] = max(record["step"] for record in records) if records else None
    row["wall_seconds"] = info.get("total_wall_seconds", info.get("wall_seconds")) if info else None
    row["status"] = _status(workdir, records, info)
    return row


def build_report(sweep_dir: str) -> list[dict]:
    """One row per run of the sweep in `sweep_dir` (see `report_row`)."""
    sweep = load_sweep(sweep_dir)
    keys = override_keys(sweep)
    return [report_row(sweep_dir, run, keys) for run in sweep["runs"]]


def _cell(column: str, value: Any) -> str:
    """A Markdown cell: metrics to 4 decimals, wall seconds to 1, override values as on the command line."""
    if value is None:
        return ""
    if column in METRIC_COLUMNS and isinstance(value, float):
        return f"{value:.4f}"
    if column == "wall_seconds" and isinstance(value, float):
        return f"{value:.1f}"
    return value if isinstance(value, str) else format_value(value)


def markdown_table(rows: Sequence[dict]) -> str:
    """The rows as a Markdown table (blanks for missing values)."""
    if not rows:
        return "(no runs)\n"
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(column, row[column]).replace("|", "\\|") for column in columns) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[dict], path: str) -> None:
    """The rows as CSV with full-precision numbers."""
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        if rows:
            writer.writerow(list(rows[0]))
        for row in rows:
            writer.writerow(["" if value is None else value if isinstance(value, (int, float, str))
                             else format_value(value) for value in row.values()])


def plot_loss_curves(sweep_dir: str, names: Sequence[str], path: str) -> None:
    """Two panels, train/loss and eval/loss against step, one line per run with metrics."""
    import matplotlib

    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    plotted = False
    for name in names:
        records = read_metrics(os.path.join(sweep_dir, name))
        for axis, key in zip(axes, ("train/loss", "eval/loss")):
            points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            if points:
                axis.plot(*zip(*points), marker="o" if key == "eval/loss" else None, markersize=3, label=name)
                plotted = True
    for axis, key in zip(axes, ("train/loss", "eval/loss")):
        axis.set(title=key, xlabel="step", ylabel="loss")
        axis.grid(alpha=0.3)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        if axis.lines:
            axis.legend(fontsize="small")
    if not plotted:
        figure.suptitle("no run has metrics yet")
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_report(sweep_dir: str) -> str:
    """Writes report.md, report.csv and loss_curves.png into `sweep_dir`; returns the Markdown table."""
    rows = build_report(sweep_dir)
    table = markdown_table(rows)
    sweep = load_sweep(sweep_dir)
    with open(os.path.join(sweep_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write(f"# Sweep {sweep.get('config', '')}\n\nextra train arguments: "
                f"`{' '.join(sweep.get('extra_args', [])) or '(none)'}`\n\n{table}")
    write_csv(rows, os.path.join(sweep_dir, "report.csv"))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SweepError(f"wrote report.md and report.csv in {sweep_dir}, but loss_curves.png needs matplotlib: "
                         "pip install matplotlib") from None
    plot_loss_curves(sweep_dir, [row["name"] for row in rows], os.path.join(sweep_dir, "loss_curves.png"))
    return table


def define_flags() -> None:
    """The command-line flags (defined only when run as a program)."""
    flags.DEFINE_string("sweep_dir", None, "directory written by launch.sweep (holds sweep.json)")
    flags.mark_flags_as_required(["sweep_dir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    sweep_dir = flags.FLAGS.sweep_dir
    try:
        table = write_report(sweep_dir)
    except SweepError as error:
        raise SystemExit(f"error: {error}") from None
    print(table, end="")
    print(f"wrote {os.path.join(sweep_dir, 'report.md')}, report.csv and loss_curves.png")


if __name__ == "__main__":
    define_flags()
    app.run(main)
