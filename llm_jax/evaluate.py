"""Evaluates the latest checkpoint of a run, prints the metrics and appends them to DIR/metrics.jsonl, marked
"source": "evaluate" so they are told apart from the training run's own lines.

    python -m llm_jax.evaluate --workdir=runs/shakespeare_char --split=validation --eval_steps=200
"""

from __future__ import annotations

import json

import jax
from absl import app, flags, logging

from llm_jax.cli import check_saved_run, quiet_library_logs, run_reporting_errors
from llm_jax.errors import ConfigError
from llm_jax.training.evaluation import Evaluator
from llm_jax.training.metrics import MetricsWriter
from llm_jax.training.run import build_saved_run, restore_latest_params
from llm_jax.workdir_lock import metrics_lock

_WORKDIR = flags.DEFINE_string("workdir", None, "run directory written by llm_jax.train")
_SPLIT = flags.DEFINE_string("split", None, "split to evaluate (default: the run's data.eval_split)")
_EVAL_STEPS = flags.DEFINE_integer("eval_steps", None, "batches to evaluate, -1 = the whole split with "
                                   "data.pipeline=grain (default: the run's train.eval_steps)")
flags.mark_flag_as_required("workdir")

SOURCE_FIELDS = {"source": "evaluate"}  # in each metrics.jsonl line evaluate appends (not sent to TensorBoard)


def evaluate_checkpoint(workdir: str, split: str | None, eval_steps: int | None
                        ) -> tuple[int, dict[str, float], str]:
    """(step, metrics, the task's report, e.g. per-class precision/recall) of the latest checkpoint; the metric
    names carry the split unless it is the run's evaluation split (data.eval_split)."""
    if eval_steps is not None and eval_steps != -1 and eval_steps < 1:
        raise ConfigError(f"--eval_steps={eval_steps}: give a number of batches >= 1, or -1 for the whole split")
    check_saved_run(workdir)
    run = build_saved_run(workdir, with_data=True)
    split = split or run.config.data.eval_split
    step, params = restore_latest_params(run)
    with jax.set_mesh(run.mesh), run.rules_context():
        evaluator = Evaluator(run)
        metrics = evaluator.evaluate(params, split, eval_steps or run.config.train.eval_steps)
        report = run.task.report(evaluator.last_sums)
    if split != run.config.data.eval_split:
        metrics = {key.replace("eval/", f"eval_{split}/"): value for key, value in metrics.items()}
    return step, metrics, report


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    quiet_library_logs()

    def evaluate_and_report() -> None:
        step, metrics, report = evaluate_checkpoint(_WORKDIR.value, _SPLIT.value, _EVAL_STEPS.value)
        with metrics_lock(_WORKDIR.value):  # a resuming trainer rewrites metrics.jsonl under the same lock
            writer = MetricsWriter(_WORKDIR.value)
            writer.write(step, metrics, json_fields=SOURCE_FIELDS)
            writer.close()
        logging.info("step %d | %s", step, metrics)
        if report:
            logging.info("step %d, split %s:\n%s", step, _SPLIT.value or "evaluation", report)
        print(json.dumps({"step": step, **metrics}))

    run_reporting_errors(evaluate_and_report, (ConfigError, FileNotFoundError, ValueError))


if __name__ == "__main__":
    app.run(main)
