"""Summarises a sweep made by `launch.sweep`: a Markdown table, a CSV, the loss curves and scaling-law fits.

    python -m launch.report runs/sweep                          # or --sweep_dir=runs/sweep
    python -m launch.report runs/sweep --metrics=eval/accuracy,eval/f1
    python -m launch.report runs/sweep --fit=params             # eval/loss = E + A * N^(-alpha); --fit=flops
    python -m launch.length_report runs/sweep --factors=1,2,4   # eval loss at 1x/2x/4x the trained length

Reads SWEEP_DIR/sweep.json and each run's metrics.jsonl and sweep_run.json; writes SWEEP_DIR/report.md,
SWEEP_DIR/report.csv and SWEEP_DIR/loss_curves.{png,svg,pdf}, and prints the table. Runs without metrics are
"missing". The figure is titled with the experiment and its swept keys and has a panel of train loss and one of
validation loss against step (a dot per run of its final validation loss when no run evaluated more than once);
one colour per value of the first swept key, a marker and line style per value of the others.

Columns: the final value (last logged) of each metric in --metrics; by default every metric any run logged
except bookkeeping (data/*, learning rate, gradient norm, throughput, MFU, token and example counters, skipped
updates, evaluation lengths: how a run went, not how good its model is), eval/* first, then other evaluated
splits (eval_test/*, eval_len256/* of evaluate --seq_len), then train/*, each group with its loss first, then by
name. So MLM, classification and seq2seq sweeps report their own metrics (eval/mlm_accuracy, eval/accuracy,
eval/f1, ...) without a flag. A name no run logged is an error that lists the names the runs have.

--fit=AXIS adds a scaling-law fit of --fit_metric (eval/loss) over the finished runs to report.md and the
printout, and writes SWEEP_DIR/scaling_fit_AXIS.png; the fit and its axes are described in launch/scaling_fit.py.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
from typing import Any, Sequence

from absl import app, flags

from launch import scaling_fit as scaling_fit_lib
from launch.sweep import RUN_FILE, SWEEP_FILE, SweepError, short_keys, format_value, is_finished, read_metrics
from llm_jax.errors import UserError
from llm_jax.training import run_record

DEFAULT_COLUMNS = ("eval/loss", "eval/perplexity", "train/loss")  # report_row's when given none
# left out of the default columns (still available through --metrics): counters, throughput, optimizer state
BOOKKEEPING_PREFIXES = ("data",)
BOOKKEEPING_NAMES = ("learning_rate", "grad_norm", "tokens_per_second", "mfu", "tokens", "examples",
                     "skipped_updates", "seq_len")  # seq_len: evaluate --seq_len's length (eval_lenN/seq_len)
FIT_METRIC = "eval/loss"  # what --fit fits unless --fit_metric says otherwise
PLOT_STEM = "loss_curves"
PLOT_FORMATS = ("png", "svg", "pdf")  # png to look at; svg and pdf (text kept as text) for papers and slides
LOSS_UNITS = {"causal_lm": "nats per token", "masked_lm": "nats per masked token",
              "classification": "nats per example", "token_classification": "nats per labelled word"}
_STYLE = {"font.size": 13, "axes.titlesize": 15, "axes.labelsize": 14, "xtick.labelsize": 12, "ytick.labelsize": 12,
          "legend.fontsize": 12, "legend.title_fontsize": 12, "figure.titlesize": 16, "lines.linewidth": 2.0,
          "lines.markersize": 6, "svg.fonttype": "none", "pdf.fonttype": 42, "savefig.bbox": "tight"}
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
_LINESTYLES = ("-", "--", "-.", ":")
_MAX_MARKERS = 12  # per train curve: every point of a long run would hide the line


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


def final_metrics(records: Sequence[dict]) -> dict[str, float]:
    """Every scalar metric of a run at its last logged value (the last record that holds it)."""
    finals: dict[str, float] = {}
    for record in records:
        finals.update({key: value for key, value in record.items() if "/" in key and isinstance(value, (int, float))
                       and not isinstance(value, bool)})
    return finals


def is_bookkeeping(name: str) -> bool:
    """Whether a metric says how a run went rather than how good its model is (left out of the default columns)."""
    return (name.partition("/")[0] in BOOKKEEPING_PREFIXES
            or name.rpartition("/")[2] in BOOKKEEPING_NAMES)


def _metric_order(name: str) -> tuple[int, bool, str]:
    """eval/* first, then other evaluated splits (eval_test/*), then train/*, then the rest; loss first in each."""
    prefix, _, last = name.partition("/")
    group = 0 if prefix == "eval" else 1 if prefix.startswith("eval_") else 2 if prefix == "train" else 3
    return group, last != "loss", name


def default_metrics(available: Sequence[str]) -> list[str]:
    """The report's default columns: every non-bookkeeping metric the runs logged, in `_metric_order`."""
    return sorted((name for name in available if not is_bookkeeping(name)), key=_metric_order)


def choose_metrics(available: Sequence[str], requested: Sequence[str] | None, flag: str = "--metrics") -> list[str]:
    """`requested` (checked against what the runs logged, when they logged any; errors name `flag`) or, when
    None, `default_metrics(available)`."""
    if requested is None:
        return default_metrics(available)
    unknown = [name for name in requested if name not in available]
    if unknown and available:
        raise SweepError(f"{flag}: no run logged {', '.join(unknown)}; the runs have: "
                         f"{', '.join(sorted(available, key=_metric_order))}")
    return list(requested)


def report_row(sweep_dir: str, run: dict, keys: Sequence[str], metrics: Sequence[str] = DEFAULT_COLUMNS
               ) -> dict[str, Any]:
    """One table row: name, the run's override values, the final value of each of `metrics`, steps, wall seconds
    and status."""
    workdir = os.path.join(sweep_dir, run["name"])
    records, info = read_metrics(workdir), _read_run_info(workdir)
    row: dict[str, Any] = {"name": run["name"]}
    row.update({key: run.get("overrides", {}).get(key) for key in keys})
    finals = final_metrics(records)
    row.update({metric: finals.get(metric) for metric in metrics})
    row["steps"] = max(record["step"] for record in records) if records else None
    row["wall_seconds"] = info.get("total_wall_seconds", info.get("wall_seconds")) if info else None
    row["status"] = _status(workdir, records, info)
    return row


def sweep_metrics(sweep_dir: str, sweep: dict) -> list[str]:
    """Every metric name any run of the sweep logged."""
    names: dict[str, None] = {}
    for run in sweep["runs"]:
        names.update(dict.fromkeys(final_metrics(read_metrics(os.path.join(sweep_dir, run["name"])))))
    return list(names)


def build_report(sweep_dir: str, metrics: Sequence[str] | None = None) -> list[dict]:
    """One row per run of the sweep in `sweep_dir` (see `report_row`), with `metrics` as columns (None: the
    default columns, see `default_metrics`); a metric no run logged is a SweepError listing those they did."""
    sweep = load_sweep(sweep_dir)
    keys = override_keys(sweep)
    columns = choose_metrics(sweep_metrics(sweep_dir, sweep), metrics)
    return [report_row(sweep_dir, run, keys, columns) for run in sweep["runs"]]


def _cell(column: str, value: Any) -> str:
    """A Markdown cell: metrics to 4 decimals, wall seconds to 1, override values as on the command line."""
    if value is None:
        return ""
    if "/" in column and isinstance(value, float):  # metric names have a slash, swept keys dots
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


@dataclasses.dataclass
class RunCurves:
    """What the plot shows of one run: its legend label, style and (step, loss) points."""

    name: str
    label: str  # 'learning_rate=0.001, d_model=64', for the legend
    values: str  # '0.001, 64', for the final-loss axis
    style: dict[str, Any]
    train: list[tuple[int, float]]
    evals: list[tuple[int, float]]


def experiment_name(sweep: dict) -> str:
    """'shakespeare_char:quick': the experiment file's name and variant."""
    experiment = os.path.splitext(os.path.basename(sweep.get("experiment") or sweep.get("config") or "sweep"))[0]
    return experiment + (f":{sweep['variant']}" if sweep.get("variant") else "")


def sweep_title(sweep: dict, keys: Sequence[str]) -> str:
    """'shakespeare_char:quick: sweep of optimizer.learning_rate × model.d_model (6 runs)'."""
    experiment = experiment_name(sweep)
    swept = " × ".join(keys) if keys else "no swept keys"
    return f"{experiment}: sweep of {swept} ({len(sweep['runs'])} runs)"


def run_label(run: dict, short: dict[str, str], with_keys: bool = True) -> str:
    """'learning_rate=0.001, d_model=64' (or '0.001, 64'): the run's swept values; its name when none."""
    overrides = run.get("overrides", {})
    return ", ".join(f"{short[key]}={format_value(value)}" if with_keys else format_value(value)
                     for key, value in overrides.items()) or run["name"]


def _palette(count: int, ordered: bool) -> list[Any]:
    """`count` colours: viridis (dark to light) for ordered numeric values, tab10 otherwise."""
    import matplotlib

    if ordered or count > 10:
        colormap = matplotlib.colormaps["viridis"]
        return [colormap(0.85 * index / max(count - 1, 1)) for index in range(count)]
    return [matplotlib.colormaps["tab10"](index) for index in range(count)]


def run_styles(runs: Sequence[dict], keys: Sequence[str]) -> list[dict[str, Any]]:
    """Colour per value of the first swept key, marker and line style per value of the other keys; one colour
    and marker per run when nothing is swept or two runs share all values, so every curve stays distinct."""
    combos = [tuple(format_value(run.get("overrides", {}).get(key)) for key in keys) for run in runs]
    firsts = [run.get("overrides", {}).get(keys[0]) for run in runs] if keys else []
    numeric = bool(firsts) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in firsts)
    if not keys or len(set(combos)) < len(combos):
        colour_ids = shape_ids = list(range(len(runs)))
        numeric = False
    else:
        order = sorted(set(firsts)) if numeric else list(dict.fromkeys(combo[0] for combo in combos))
        colour_ids = [order.index(value if numeric else combo[0]) for value, combo in zip(firsts, combos)]
        rests = list(dict.fromkeys(combo[1:] for combo in combos))
        shape_ids = [rests.index(combo[1:]) for combo in combos]
    colours = _palette(max(colour_ids, default=0) + 1, numeric)
    return [{"color": colours[c], "marker": _MARKERS[s % len(_MARKERS)], "linestyle": _LINESTYLES[s % len(_LINESTYLES)]}
            for c, s in zip(colour_ids, shape_ids)]


def load_curves(sweep_dir: str, sweep: dict) -> list[RunCurves]:
    """The train and eval loss points of every run of the sweep that logged any."""
    keys = override_keys(sweep)
    short = short_keys([run.get("overrides", {}) for run in sweep["runs"]])
    curves = []
    for run, style in zip(sweep["runs"], run_styles(sweep["runs"], keys)):
        records = read_metrics(os.path.join(sweep_dir, run["name"]))
        points = {key: [(r["step"], r[key]) for r in records if r.get(key) is not None]
                  for key in ("train/loss", "eval/loss")}
        if points["train/loss"] or points["eval/loss"]:
            curves.append(RunCurves(run["name"], run_label(run, short), run_label(run, short, False), style,
                                    points["train/loss"], points["eval/loss"]))
    return curves


def loss_unit(sweep_dir: str, names: Sequence[str]) -> str:
    """The loss's unit, from the first run's config.json (data.objective); plain 'nats' if none is readable."""
    for name in names:
        try:
            data = (run_record.read_record(os.path.join(sweep_dir, name)) or {})["config"]["data"]
        except (UserError, KeyError, TypeError):
            continue
        unit = LOSS_UNITS.get(data.get("objective", "causal_lm"), "nats")
        if data.get("objective") == "masked_lm" and data.get("sentence_task", "none") != "none":
            unit += " + sentence-pair loss"
        return unit
    return "nats"


def _plot_curves(axis: Any, curves: Sequence[RunCurves], attribute: str, title: str, unit: str) -> None:
    """One line with markers per run: loss against step."""
    from matplotlib.ticker import MaxNLocator

    for run in curves:
        points = getattr(run, attribute)
        if points:
            axis.plot(*zip(*points), label=run.label, markevery=max(1, len(points) // _MAX_MARKERS), **run.style)
    axis.set(title=title, xlabel="training step", ylabel=f"loss ({unit})")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.grid(alpha=0.3)


def _plot_finals(axis: Any, curves: Sequence[RunCurves], swept: str, unit: str) -> None:
    """A dot per run at its last eval loss, runs down the y axis in sweep order, each value written beside it."""
    runs = [run for run in curves if run.evals]
    for row, run in enumerate(runs):
        loss = run.evals[-1][1]
        axis.plot([loss], [row], linestyle="none", color=run.style["color"], marker=run.style["marker"],
                  markersize=10, label=run.label)
        axis.annotate(f"{loss:.3f}", (loss, row), xytext=(9, 0), textcoords="offset points", va="center")
    steps = sorted({run.evals[-1][0] for run in runs})
    at = f"at step {steps[0]}" if len(steps) == 1 else "at each run's last evaluation"
    axis.set(title=f"final validation loss {at}", xlabel=f"loss ({unit})", yticks=range(len(runs)),
             yticklabels=[run.values for run in runs], ylabel=swept, ylim=(len(runs) - 0.5, -0.5))
    axis.margins(x=0.2)
    axis.grid(alpha=0.3, axis="x")


def loss_figure(sweep_dir: str, sweep: dict) -> Any:
    """The figure of the sweep: train loss curves; validation loss curves when a run evaluated more than once,
    else each run's final validation loss as a dot chart (lines through single points would look empty)."""
    import matplotlib.pyplot as plt

    curves, keys = load_curves(sweep_dir, sweep), override_keys(sweep)
    unit = loss_unit(sweep_dir, [run.name for run in curves])
    panels, eval_curves = [], any(len(run.evals) > 1 for run in curves)
    if any(run.train for run in curves):
        panels.append(lambda axis: _plot_curves(axis, curves, "train", "train loss", unit))
    if eval_curves:
        panels.append(lambda axis: _plot_curves(axis, curves, "evals", "validation loss", unit))
    elif any(run.evals for run in curves):
        swept = ", ".join(short_keys([run.get("overrides", {}) for run in sweep["runs"]]).values()) or "run"
        panels.append(lambda axis: _plot_finals(axis, curves, swept, unit))
    height = max(4.8, 1.5 + 0.45 * len(curves))
    figure, axes = plt.subplots(1, max(len(panels), 1), figsize=(6.2 * max(len(panels), 1) + 3.5, height),
                                constrained_layout=True, squeeze=False, sharex=eval_curves)
    for axis, draw in zip(axes[0], panels):
        draw(axis)
    figure.suptitle(sweep_title(sweep, keys), fontweight="bold")
    if not panels:
        axes[0][0].set_axis_off()
        axes[0][0].text(0.5, 0.5, "no run has metrics yet", ha="center", va="center", transform=axes[0][0].transAxes)
    else:
        legend: dict[str, Any] = {}  # the first panel's handle per run: a line with its marker
        for axis in axes[0]:
            for handle, label in zip(*axis.get_legend_handles_labels()):
                legend.setdefault(label, handle)
        figure.legend(legend.values(), legend.keys(), loc="outside right center", title=" × ".join(keys) or "run",
                      frameon=False)
    return figure


def plot_loss_curves(sweep_dir: str, sweep: dict, stem: str) -> list[str]:
    """Writes the sweep's figure (see `loss_figure`) to STEM.png, STEM.svg and STEM.pdf; returns the paths."""
    import matplotlib

    for library in ("matplotlib", "fontTools"):  # absl's INFO level would print the PDF's font subsetting
        logging.getLogger(library).setLevel(logging.WARNING)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [f"{stem}.{extension}" for extension in PLOT_FORMATS]
    with matplotlib.rc_context(_STYLE):
        figure = loss_figure(sweep_dir, sweep)
        for path in paths:
            figure.savefig(path, dpi=150)
    plt.close(figure)
    return paths


def _finished_values(sweep_dir: str, sweep: dict, metric: str) -> tuple[list[str], list[float | None]]:
    """(run names, the final `metric` of each run that finished, None for the others)."""
    names, values = [], []
    for run in sweep["runs"]:
        workdir = os.path.join(sweep_dir, run["name"])
        records = read_metrics(workdir)
        names.append(run["name"])
        values.append(final_metrics(records).get(metric) if records and is_finished(workdir) else None)
    return names, values


def scaling_fit(sweep_dir: str, sweep: dict, axis: str, metric: str = FIT_METRIC) -> tuple[str, str]:
    """Fits `metric` = E + A * x^(-alpha) over the sweep's finished runs, x from FIT_AXES[axis]; writes
    SWEEP_DIR/scaling_fit_AXIS.png and returns (the fit's Markdown, the PNG path)."""
    if axis not in scaling_fit_lib.FIT_AXES:
        raise SweepError(f"--fit={axis}: choose one of {', '.join(scaling_fit_lib.FIT_AXES.names())}")
    available = sweep_metrics(sweep_dir, sweep)
    if not available:
        raise SweepError(f"--fit: no run of {sweep_dir} has metrics yet; run the sweep first")
    choose_metrics(available, [metric], "--fit_metric")
    names, values = _finished_values(sweep_dir, sweep, metric)
    try:
        fit, used = scaling_fit_lib.fit_sweep_runs(sweep_dir, names, axis, values)
    except scaling_fit_lib.FitError as error:
        unfinished = sum(value is None for value in values)
        left_out = (f" ({unfinished} of the {len(names)} runs of {sweep_dir} have not finished or did not log "
                    f"{metric})") if unfinished else ""
        raise SweepError(f"{error}{left_out}") from None
    path = scaling_fit_lib.plot_fit(fit, axis, metric, os.path.join(sweep_dir, f"scaling_fit_{axis}.png"),
                                    f"{experiment_name(sweep)}: {metric} against "
                                    f"{scaling_fit_lib.FIT_AXES.get(axis).label} ({len(used)} runs)")
    return scaling_fit_lib.fit_markdown(fit, used, axis, metric), path


def write_report(sweep_dir: str, metrics: Sequence[str] | None = None, fit: str | None = None,
                 fit_metric: str = FIT_METRIC) -> str:
    """Writes report.md, report.csv and loss_curves.{png,svg,pdf} into `sweep_dir` (with `fit`, also the scaling
    fit's section of report.md and scaling_fit_FIT.png); returns the Markdown printed: the table and the fit."""
    rows = build_report(sweep_dir, metrics)
    table = markdown_table(rows)
    sweep = load_sweep(sweep_dir)
    fit_text = "\n" + scaling_fit(sweep_dir, sweep, fit, fit_metric)[0] if fit else ""
    with open(os.path.join(sweep_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write(f"# Sweep {sweep.get('config', '')}\n\nextra train arguments: "
                f"`{' '.join(sweep.get('extra_args', [])) or '(none)'}`\n\n{table}{fit_text}")
    write_csv(rows, os.path.join(sweep_dir, "report.csv"))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SweepError(f"wrote report.md and report.csv in {sweep_dir}, but the {PLOT_STEM} plots need "
                         "matplotlib: pip install matplotlib") from None
    plot_loss_curves(sweep_dir, sweep, os.path.join(sweep_dir, PLOT_STEM))
    return table + fit_text


def define_flags() -> None:
    """The command-line flags (defined only when run as a program)."""
    flags.DEFINE_string("sweep_dir", None, "directory written by launch.sweep (holds sweep.json); also accepted "
                        "as the one positional argument")
    flags.DEFINE_list("metrics", None, "metric columns, e.g. eval/accuracy,eval/f1 (default: every metric the runs "
                      "logged but bookkeeping such as learning rate, throughput and token counts; eval/* first)")
    flags.DEFINE_enum("fit", None, scaling_fit_lib.FIT_AXES.names(), "fit METRIC = E + A * N^(-alpha) over the "
                      "finished runs, N = non-embedding parameters (params) or training FLOPs (flops)")
    flags.DEFINE_string("fit_metric", FIT_METRIC, "the final metric --fit fits")


def main(argv: list[str]) -> None:
    if len(argv) > 2 or (len(argv) == 2 and flags.FLAGS.sweep_dir):
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}; give the sweep directory once")
    sweep_dir = flags.FLAGS.sweep_dir or (argv[1] if len(argv) == 2 else None)
    if not sweep_dir:
        raise app.UsageError("give the sweep directory: python -m launch.report SWEEP_DIR (or --sweep_dir=SWEEP_DIR)")
    f = flags.FLAGS
    try:
        text = write_report(sweep_dir, f.metrics, f.fit, f.fit_metric)
    except UserError as error:
        raise SystemExit(f"error: {error}") from None
    print(text, end="")
    plots = ", ".join(f"{PLOT_STEM}.{extension}" for extension in PLOT_FORMATS)
    fitted = f", scaling_fit_{f.fit}.png" if f.fit else ""
    print(f"wrote {os.path.join(sweep_dir, 'report.md')}, report.csv, {plots}{fitted}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
