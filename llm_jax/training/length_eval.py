"""Evaluation at a context length other than the trained one (length generalisation).

    python -m llm_jax.evaluate --workdir=runs/x --seq_len=256                       # method chosen per encoding
    python -m llm_jax.evaluate --workdir=runs/x --seq_len=256 --length_method=sliding_window

The evaluation data is cut into rows of N = --seq_len tokens and scored by one of LENGTH_METHODS:

- `direct`: the model runs on the N tokens at once. Every encoding that computes positions instead of looking them
  up runs at any N this way: sinusoidal, rope, alibi, none, and biases of relative distances (T5's buckets).
- `sliding_window`: each row is scored by windows of model.max_len tokens that advance by `stride` (default
  max_len // 2); a window counts only the targets that no earlier window counted, so every token is scored exactly
  once, with between max_len - stride and max_len tokens of context (the first window's tokens with fewer).
  Positions restart at 0 in each window (per document with packed segments), so a table of max_len absolute
  positions is never read past its end.
- `auto` (the default): sliding_window when N > model.max_len and the encoding is not defined past max_len, else
  direct. Whether it is comes from the encoding's `extrapolates` field in POSITIONALS (learned: False) when
  the registry entry has one, else from the parameters: a parameter with the logical axis "positions" (a
  table of absolute positions, like learned's max_len rows) cannot extrapolate. No list of names lives here.

Comparing lengths: with data.pipeline=grain and --eval_steps=-1 every length scores the same tokens (the whole
split) in longer rows; data.pipeline=windows draws its random windows per length, so lengths score different text.

Cross-attention (encoder-decoder models) takes no positional encoding, its keys being encoder outputs: only the
positions of self-attention matter, and those are what --seq_len stretches.

Metrics: the task's eval metrics under the prefix `eval_len{N}/` (`eval_{split}_len{N}/` for another split than
data.eval_split), e.g. eval_len256/loss, eval_len256/perplexity, plus eval_len256/seq_len = N; the JSON line of
metrics.jsonl also holds the string field eval_len256/length_method ("direct" or "sliding_window"). The
training run's own eval/loss is never overwritten, so launch.report's final eval/loss stays the trained length's.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import numpy as np

from llm_jax.cli import check_saved_run
from llm_jax.data.pipeline import build_data
from llm_jax.errors import ConfigError
from llm_jax.models.positions import POSITIONALS
from llm_jax.registry import Registry
from llm_jax.sharding import process_batch_rows
from llm_jax.tasks import build_task
from llm_jax.training.evaluation import Evaluator
from llm_jax.training.metrics import MetricsWriter
from llm_jax.training.run import Run, build_saved_run, model_inputs_fn, restore_latest_params
from llm_jax.training.state import abstract_params
from llm_jax.workdir_lock import metrics_lock

Batch = dict[str, np.ndarray]
ABSOLUTE_POSITION_AXIS = "positions"  # the logical axis of parameters indexed by absolute position
AUTO = "auto"
SOURCE_FIELDS = {"source": "evaluate"}  # in each metrics.jsonl line evaluate appends (not sent to TensorBoard)


@dataclasses.dataclass(frozen=True)
class Window:
    """One window of a row: its first input position, and the first position whose target it counts."""

    start: int
    first_scored: int


def sliding_windows(seq_len: int, window: int, stride: int) -> list[Window]:
    """Windows of `window` tokens over a row of `seq_len`, `stride` apart; the last is moved back to end at the
    row's end (every window has the same shape, so one compiled step serves them all)."""
    if not 1 <= stride <= window:
        raise ConfigError(f"sliding-window stride {stride} must be between 1 and the window, {window} tokens")
    if seq_len <= window:
        return [Window(0, 0)]
    windows, scored_to, start = [], 0, 0
    while scored_to < seq_len:
        start = min(start, seq_len - window)
        windows.append(Window(start, scored_to))
        scored_to, start = start + window, start + stride
    return windows


def window_batch(batch: Batch, window: Window, size: int) -> Batch:
    """The [rows, size] slice of a causal-LM batch at `window`, its already-counted targets weighted 0 and its
    positions (packed segments) restarted at 0 for the document the window starts in."""
    if "weights" not in batch or "targets" not in batch:
        raise ConfigError(f"sliding-window evaluation scores next-token targets (data.objective=causal_lm); this "
                          f"batch has {', '.join(sorted(batch))}: use --length_method=direct")
    batch = {key: np.asarray(value) for key, value in batch.items()}
    seq_len = batch["targets"].shape[1]
    stop = window.start + size
    view = {key: value[:, window.start:stop] if value.ndim >= 2 and value.shape[1] == seq_len else value
            for key, value in batch.items()}
    weights = view["weights"].copy()
    weights[:, :window.first_scored - window.start] = 0
    view["weights"] = weights
    if "positions" in view and "segment_ids" in view:
        same_document = view["segment_ids"] == view["segment_ids"][:, :1]
        view["positions"] = np.where(same_document, view["positions"] - view["positions"][:, :1], view["positions"])
    return view


def window_views(window: int, stride: int) -> Callable[[Batch], Iterator[Batch]]:
    """batch -> its sliding windows (see `sliding_windows`), for `Evaluator.evaluate(views=...)`."""

    def views(batch: Batch) -> Iterator[Batch]:
        seq_len = batch["targets"].shape[1] if "targets" in batch else window
        size = min(window, seq_len)
        for each in sliding_windows(seq_len, size, min(stride, size)):
            yield window_batch(batch, each, size)

    return views


# ----------------------------------------------------------------------------- choosing the method


def absolute_position_params(run: Run) -> list[str]:
    """The paths of the model's parameters indexed by absolute position (logical axis "positions")."""
    boxed = abstract_params(run.model, model_inputs_fn(run.task))
    leaves = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda leaf: isinstance(leaf, nn.Partitioned))
    return [jax.tree_util.keystr(path) for path, leaf in leaves
            if isinstance(leaf, nn.Partitioned) and ABSOLUTE_POSITION_AXIS in (leaf.names or ())]


def fixed_length_reason(run: Run) -> str | None:
    """Why the model cannot run past model.max_len (None when it can): the encoding's own `extrapolates` field
    of POSITIONALS when it declares one, else a parameter indexed by absolute position."""
    name = run.model_config.positional
    declared = getattr(POSITIONALS.get(name), "extrapolates", None) if name in POSITIONALS else None
    if declared is not None:
        return None if declared else f"model.positional={name!r} is not defined past model.max_len"
    tables = absolute_position_params(run)
    return f"model.positional={name!r} looks positions up in a table ({tables[0]})" if tables else None


def _direct(run: Run, seq_len: int, reason: str | None) -> None:
    """Checks that the model can run on `seq_len` tokens at once."""
    max_len = run.model_config.max_len
    if seq_len > max_len and reason:
        raise ConfigError(f"{reason}: it cannot score {seq_len} tokens at once with model.max_len={max_len}; use "
                          "--length_method=sliding_window (or auto)")


def _sliding(run: Run, seq_len: int, reason: str | None) -> None:
    """Sliding windows need next-token targets; any encoding runs in windows of max_len."""
    if run.task.name != "causal_lm":
        raise ConfigError(f"--length_method=sliding_window scores next-token targets; data.objective="
                          f"{run.task.name!r} has none: use --length_method=direct")


LENGTH_METHODS: Registry[Callable[[Run, int, str | None], None]] = Registry("length method")
LENGTH_METHODS.add("direct", _direct)
LENGTH_METHODS.add("sliding_window", _sliding)


def choose_method(run: Run, seq_len: int, requested: str = AUTO) -> str:
    """The method `requested` (checked to work for this model at `seq_len`), or for `auto` sliding_window when
    the model cannot run on `seq_len` tokens directly, else direct."""
    reason = fixed_length_reason(run)
    if requested == AUTO:
        requested = "sliding_window" if seq_len > run.model_config.max_len and reason else "direct"
    LENGTH_METHODS.get(requested)(run, seq_len, reason)
    return requested


# ----------------------------------------------------------------------------- the run at another length


def check_seq_len(seq_len: Any) -> int:
    """`seq_len` as a positive int, or a ConfigError users can act on (raised before anything is loaded)."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
        raise ConfigError(f"--seq_len={seq_len}: give the evaluation context length as a whole number of tokens "
                          ">= 1, e.g. --seq_len=256")
    return int(seq_len)


def config_at_length(config: Any, seq_len: int) -> Any:
    """A copy of a saved run's config whose data rows hold `seq_len` tokens. It is not validated again: its
    data.seq_len may exceed model.max_len (the check of training configs) because the model keeps the saved
    max_len and the chosen method keeps every position lookup inside it."""
    config = copy.deepcopy(config)
    config.data.seq_len = seq_len
    return config


def run_at_length(saved: Run, seq_len: int) -> Run:
    """`saved` (a run built by `build_saved_run`: model, mesh, tokenizer) with evaluation data in rows of `seq_len`
    tokens."""
    config = config_at_length(saved.config, seq_len)
    rows = process_batch_rows(saved.mesh, saved.rules, config.train.batch_size)
    data = build_data(config, rows=rows, tokenizer_dir=os.path.join(saved.workdir, "tokenizer"))
    return dataclasses.replace(saved, config=config, data=data, task=build_task(config))


def build_run_at_length(workdir: str, seq_len: int) -> Run:
    """The run saved in `workdir` with evaluation data in rows of `seq_len` tokens."""
    return run_at_length(build_saved_run(workdir, with_data=False), seq_len)


def length_prefix(split: str, eval_split: str, seq_len: int) -> str:
    """'eval_len256' (or 'eval_test_len256' for another split than the run's evaluation split)."""
    return f"eval_len{seq_len}" if split == eval_split else f"eval_{split}_len{seq_len}"


def length_metrics(metrics: dict[str, float], prefix: str, seq_len: int, method: str
                   ) -> tuple[dict[str, float], dict[str, str]]:
    """(the task's eval/* metrics renamed to PREFIX/* plus PREFIX/seq_len, the JSON field PREFIX/length_method)."""
    renamed = {prefix + key[key.index("/"):]: value for key, value in metrics.items()}
    renamed[f"{prefix}/seq_len"] = float(seq_len)
    return renamed, {f"{prefix}/length_method": method}


def check_options(seq_len: Any, method: str, stride: Any) -> int:
    """--seq_len as an int, with --length_method and --stride checked too (before anything is loaded)."""
    seq_len = check_seq_len(seq_len)
    if method != AUTO and method not in LENGTH_METHODS:
        raise ConfigError(f"--length_method={method}: choose {AUTO} or one of {', '.join(LENGTH_METHODS.names())}")
    if isinstance(stride, bool) or not isinstance(stride, (int, np.integer)) or stride < 0:
        raise ConfigError(f"--stride={stride}: give the sliding-window stride in tokens (>= 1), or 0 for "
                          "model.max_len // 2")
    return seq_len


def evaluate_run(run: Run, params: Any, split: str, eval_steps: int | None,
                 views: Callable[[Batch], Iterator[Batch]] | None = None) -> tuple[dict[str, float], str]:
    """(the task's eval/* metrics, its report) of `params` over `eval_steps` batches of `split` (None:
    train.eval_steps), each batch scored as `views` cuts it (None: whole)."""
    with jax.set_mesh(run.mesh), run.rules_context():
        evaluator = Evaluator(run)
        metrics = evaluator.evaluate(params, split, eval_steps or run.config.train.eval_steps, views)
        return metrics, run.task.report(evaluator.last_sums)


def evaluate_lengths(workdir: str, lengths: list[int], split: str | None = None, eval_steps: int | None = None,
                     method: str = AUTO, stride: int = 0
                     ) -> Iterator[tuple[int, dict[str, float], dict[str, str], str]]:
    """(step, metrics, JSON fields, the task's report) of the latest checkpoint evaluated on rows of each of
    `lengths` tokens by `method` (see the module docstring; `stride` 0 = model.max_len // 2). The model is built
    and restored once; each length builds its data and compiles its step."""
    saved = build_saved_run(workdir, with_data=False)
    window = saved.model_config.max_len
    if stride > window:
        raise ConfigError(f"--stride={stride} exceeds the window of model.max_len={window} tokens: tokens between "
                          "windows would go unscored; give --stride <= model.max_len (0 = max_len // 2)")
    chosen = [choose_method(saved, seq_len, method) for seq_len in lengths]  # every error before any work
    step, params = restore_latest_params(saved)
    for seq_len, each in zip(lengths, chosen):
        run = run_at_length(saved, seq_len)
        split_name = split or run.config.data.eval_split
        views = window_views(window, stride or max(1, window // 2)) if each == "sliding_window" else None
        metrics, report = evaluate_run(run, params, split_name, eval_steps, views)
        prefix = length_prefix(split_name, run.config.data.eval_split, seq_len)
        yield (step, *length_metrics(metrics, prefix, seq_len, each), report)


def evaluate_at_length(workdir: str, seq_len: int, split: str | None = None, eval_steps: int | None = None,
                       method: str = AUTO, stride: int = 0) -> tuple[int, dict[str, float], dict[str, str], str]:
    """`evaluate_lengths` at one length."""
    return next(evaluate_lengths(workdir, [seq_len], split, eval_steps, method, stride))


def append_eval_record(workdir: str, step: int, metrics: dict[str, float], fields: dict[str, str]) -> None:
    """Appends one evaluation line to DIR/metrics.jsonl (and TensorBoard), marked "source": "evaluate", under the
    lock a resuming trainer rewrites metrics.jsonl with."""
    with metrics_lock(workdir):
        writer = MetricsWriter(workdir)
        writer.write(step, metrics, json_fields={**SOURCE_FIELDS, **fields})
        writer.close()


def evaluate_checkpoint(workdir: str, split: str | None, eval_steps: int | None, seq_len: int | None = None,
                        length_method: str = AUTO, stride: int = 0
                        ) -> tuple[int, dict[str, float], str, dict[str, str]]:
    """(step, metrics, the task's report, e.g. per-class precision/recall, extra JSON fields) of the latest
    checkpoint; the metric names carry the split unless it is the run's evaluation split (data.eval_split), and
    with `seq_len` the length (eval_lenN/*; see llm_jax.training.length_eval)."""
    if eval_steps is not None and eval_steps != -1 and eval_steps < 1:
        raise ConfigError(f"--eval_steps={eval_steps}: give a number of batches >= 1, or -1 for the whole split")
    if seq_len is not None:
        seq_len = check_options(seq_len, length_method, stride)
        check_saved_run(workdir)
        step, metrics, fields, report = evaluate_at_length(workdir, seq_len, split, eval_steps,
                                                                       length_method, stride)
        return step, metrics, report, fields
    if length_method != AUTO or stride:
        raise ConfigError("--length_method and --stride choose how --seq_len=N is evaluated; give --seq_len too")
    check_saved_run(workdir)
    run = build_saved_run(workdir, with_data=True)
    split = split or run.config.data.eval_split
    step, params = restore_latest_params(run)
    metrics, report = evaluate_run(run, params, split, eval_steps)
    if split != run.config.data.eval_split:
        metrics = {key.replace("eval/", f"eval_{split}/"): value for key, value in metrics.items()}
    return step, metrics, report, {}
