"""Length generalisation over sweeps: evaluates every finished run at multiples of its training length, then writes
a Markdown table and two plots.

    python -m launch.length_report sweeps/ablation/shakespeare sweeps/ablation/wikitext2 --factors=1,2,4 \\
        --out=docs/ablation_positions
    python -m launch.length_report sweeps/ablation/shakespeare --noevaluate       # report what is logged

For each run of each SWEEP_DIR that finished training, and each factor F, the latest checkpoint is evaluated at
F x data.seq_len tokens as `llm_jax.evaluate --seq_len` does (in this process; lengths already in the run's
metrics.jsonl are not evaluated again), which appends eval_lenN/* lines. Then it writes
- OUT.md: one row per run (encoding x dataset; the dataset is the sweep directory's name): the final train loss
  and the eval loss at each factor, the lengths, and the method of the lengths past model.max_len (direct or
  sliding_window); printed too;
- OUT_train_loss.png: train loss against step, a panel per dataset, a line per encoding;
- OUT_length.png: eval loss against evaluation length (top) and its change from the training length (bottom), a
  panel per dataset, a line per encoding (hollow markers: sliding-window scores; dotted line: the training length).
OUT defaults to the first SWEEP_DIR's `length_report`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Any, Sequence

from absl import app, flags

from launch.report import load_sweep
from launch.sweep import SweepError, is_finished, read_metrics
from llm_jax.errors import UserError
from llm_jax.training import run_record

FACTORS = (1, 2, 4)
_LENGTH_LOSS = re.compile(r"^eval_len(\d+)/loss$")
_FIGURE_STYLE = {"font.size": 12, "axes.titlesize": 13, "legend.fontsize": 10, "lines.linewidth": 2.0,
                 "savefig.bbox": "tight"}


@dataclasses.dataclass
class RunLengths:
    """What the report shows of one run: its encoding, dataset, lengths and losses."""

    encoding: str
    dataset: str
    seq_len: int  # the training length
    max_len: int
    train: list[tuple[int, float]]
    losses: dict[int, float]  # evaluation length -> eval loss
    methods: dict[int, str]  # evaluation length -> direct | sliding_window


def _saved_config(workdir: str) -> Any:
    try:
        config, _ = run_record.read_run_config(workdir)
    except (UserError, FileNotFoundError, KeyError, TypeError, ValueError) as error:
        raise SweepError(f"{workdir}: cannot read its config.json ({error}); was it written by llm_jax.train?"
                         ) from None
    return config


def logged_lengths(records: Sequence[dict]) -> tuple[dict[int, float], dict[int, str]]:
    """(evaluation length -> last eval_lenN/loss, length -> its eval_lenN/length_method) of a run's records."""
    losses, methods = {}, {}
    for record in records:
        for key, value in record.items():
            match = _LENGTH_LOSS.match(key)
            if match and isinstance(value, (int, float)):
                length = int(match.group(1))
                losses[length] = float(value)
                methods[length] = record.get(f"eval_len{length}/length_method", "")
    return losses, methods


def evaluate_missing(workdir: str, lengths: Sequence[int]) -> None:
    """Evaluates the run in `workdir` at each of `lengths` its metrics.jsonl does not hold yet (appending them)."""
    from llm_jax.training import length_eval  # imports JAX: only when something is evaluated

    logged, _ = logged_lengths(read_metrics(workdir))
    missing = [length for length in lengths if length not in logged]
    for length, (step, metrics, fields, _) in zip(missing, length_eval.evaluate_lengths(workdir, missing)):
        length_eval.append_eval_record(workdir, step, metrics, fields)
        print(f"{workdir}: {length} tokens ({fields[f'eval_len{length}/length_method']}): "
              f"loss {metrics[f'eval_len{length}/loss']:.4f}", flush=True)


def collect(sweep_dirs: Sequence[str], factors: Sequence[int], evaluate: bool) -> list[RunLengths]:
    """Every finished run of `sweep_dirs` with its logged lengths (evaluated first with `evaluate`)."""
    runs = []
    for sweep_dir in sweep_dirs:
        dataset = os.path.basename(os.path.normpath(sweep_dir))
        for run in load_sweep(sweep_dir)["runs"]:
            workdir = os.path.join(sweep_dir, run["name"])
            if not is_finished(workdir):
                print(f"{workdir}: not finished, left out", flush=True)
                continue
            config = _saved_config(workdir)
            if evaluate:
                evaluate_missing(workdir, [factor * config.data.seq_len for factor in factors])
            records = read_metrics(workdir)
            losses, methods = logged_lengths(records)
            train = [(r["step"], r["train/loss"]) for r in records if r.get("train/loss") is not None]
            runs.append(RunLengths(config.model.positional, dataset, config.data.seq_len, config.model.max_len,
                                   train, losses, methods))
    if not runs:
        raise SweepError(f"no finished run in {', '.join(sweep_dirs)}; run the sweeps first (python -m launch.sweep)")
    return runs


def length_table(runs: Sequence[RunLengths], factors: Sequence[int]) -> str:
    """Markdown: encoding, dataset, final train loss, eval loss at each factor, the lengths, the method past
    model.max_len."""
    header = ["encoding", "dataset", "train loss", *(f"loss {factor}x" for factor in factors), "eval lengths",
              "method past max_len"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        lengths = [factor * run.seq_len for factor in factors]
        losses = [f"{run.losses[n]:.4f}" if n in run.losses else "" for n in lengths]
        past = sorted({run.methods.get(n, "") for n in lengths if n > run.max_len and n in run.losses} - {""})
        train = f"{run.train[-1][1]:.4f}" if run.train else ""
        lines.append("| " + " | ".join([run.encoding, run.dataset, train, *losses,
                                        "/".join(map(str, lengths)), "/".join(past) or "-"]) + " |")
    return "\n".join(lines) + "\n"


def _panels(runs: Sequence[RunLengths], rows: int = 1) -> tuple[Any, list[dict[str, Any]], dict[str, Any]]:
    """A figure with `rows` rows of a panel per dataset, each row's panel of each dataset, a colour per encoding."""
    import matplotlib
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(run.dataset for run in runs))
    encodings = sorted({run.encoding for run in runs})
    figure, axes = plt.subplots(rows, len(datasets), figsize=(6.5 * len(datasets) + 2.0, 4.4 * rows), squeeze=False,
                                constrained_layout=True)
    colours = {name: matplotlib.colormaps["tab10"](index % 10) for index, name in enumerate(encodings)}
    return figure, [dict(zip(datasets, row)) for row in axes], colours


def _finish(figure: Any, axes: list[dict[str, Any]], title: str, path: str) -> str:
    import matplotlib.pyplot as plt

    handles: dict[str, Any] = {}
    for axis in (axis for row in axes for axis in row.values()):
        axis.grid(alpha=0.3)
        for handle, label in zip(*axis.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    figure.legend(handles.values(), handles.keys(), loc="outside right center", title="encoding", frameon=False)
    figure.suptitle(title, fontweight="bold")
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_train_loss(runs: Sequence[RunLengths], path: str) -> str:
    """Train loss against step, a panel per dataset, a line per encoding."""
    figure, (axes,), colours = _panels(runs)
    for run in runs:
        if run.train:
            axes[run.dataset].plot(*zip(*run.train), color=colours[run.encoding], label=run.encoding)
    for dataset, axis in axes.items():
        axis.set(title=dataset, xlabel="training step", ylabel="train loss (nats per token)")
    return _finish(figure, [axes], "train loss per positional encoding", path)


def plot_length_loss(runs: Sequence[RunLengths], path: str) -> str:
    """Eval loss against evaluation length (log2 axis; top row), and its change from the training length (bottom
    row, where encodings of very different losses stay readable); hollow markers for sliding-window scores."""
    figure, (absolute, change), colours = _panels(runs, rows=2)
    for run in runs:
        lengths = sorted(run.losses)
        base = run.losses.get(run.seq_len)
        for axes, offset in ((absolute, 0.0), (change, base)):
            if offset is None:
                continue
            axis, colour = axes[run.dataset], colours[run.encoding]
            axis.plot(lengths, [run.losses[n] - offset for n in lengths], color=colour, label=run.encoding)
            for n in lengths:
                hollow = run.methods.get(n) == "sliding_window"
                axis.plot([n], [run.losses[n] - offset], "o", color=colour,
                          markerfacecolor="white" if hollow else colour)
    for row, ylabel in ((absolute, "eval loss (nats per token)"), (change, "change from the training length")):
        for dataset, axis in row.items():
            trained = sorted({run.seq_len for run in runs if run.dataset == dataset})
            for length in trained:
                axis.axvline(length, color="grey", linestyle=":")
            axis.set_xscale("log", base=2)
            axis.set(title=f"{dataset} (trained at {'/'.join(map(str, trained))} tokens)",
                     xlabel="evaluation length (tokens)", ylabel=ylabel)
    return _finish(figure, [absolute, change], "eval loss against evaluation length (hollow: sliding window)", path)


def write_length_report(sweep_dirs: Sequence[str], factors: Sequence[int] = FACTORS, out: str | None = None,
                        evaluate: bool = True) -> str:
    """Evaluates what is missing (with `evaluate`), writes OUT.md, OUT_train_loss.png and OUT_length.png; returns
    the table."""
    if not sweep_dirs:
        raise SweepError("give at least one sweep directory written by launch.sweep")
    if not factors or any(not isinstance(f, int) or f < 1 for f in factors):
        raise SweepError(f"--factors={','.join(map(str, factors))}: give whole multiples of the training length >= 1")
    out = out or os.path.join(sweep_dirs[0], "length_report")
    runs = collect(sweep_dirs, factors, evaluate)
    table = length_table(runs, factors)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(f"{out}.md", "w", encoding="utf-8") as f:
        f.write(f"# Length generalisation: {', '.join(sweep_dirs)}\n\n{table}")
    import matplotlib

    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    matplotlib.use("Agg")
    with matplotlib.rc_context(_FIGURE_STYLE):
        plot_train_loss(runs, f"{out}_train_loss.png")
        plot_length_loss(runs, f"{out}_length.png")
    return table


def define_flags() -> None:
    """The command-line flags (defined only when run as a program)."""
    flags.DEFINE_list("factors", [str(f) for f in FACTORS],
                      "evaluation lengths as multiples of each run's data.seq_len")
    flags.DEFINE_string("out", None, "path stem of OUT.md, OUT_train_loss.png, OUT_length.png (default: "
                        "FIRST_SWEEP_DIR/length_report)")
    flags.DEFINE_bool("evaluate", True, "evaluate the lengths a run has not logged yet (--noevaluate: report only)")


def main(argv: list[str]) -> None:
    f = flags.FLAGS
    try:
        factors = [int(factor) for factor in f.factors]
    except ValueError:
        raise SystemExit(f"error: --factors={','.join(f.factors)}: give whole numbers, e.g. 1,2,4") from None
    try:
        table = write_length_report(argv[1:], factors, f.out, f.evaluate)
    except UserError as error:
        raise SystemExit(f"error: {error}") from None
    out = f.out or os.path.join(argv[1], "length_report")
    print(table, end="")
    print(f"wrote {out}.md, {out}_train_loss.png, {out}_length.png")


if __name__ == "__main__":
    define_flags()
    app.run(main)
