"""Evaluates the latest checkpoint of a run, prints the metrics and appends them to DIR/metrics.jsonl, marked
"source": "evaluate" so they are told apart from the training run's own lines.

    python -m llm_jax.evaluate --workdir=runs/shakespeare_char --split=validation --eval_steps=200
    python -m llm_jax.evaluate --workdir=runs/shakespeare_char --seq_len=256      # at 4x the trained context

With --seq_len=N the rows hold N tokens, scored directly or by sliding windows of model.max_len tokens (learned
positions), and the metrics are named eval_lenN/* with eval_lenN/length_method saying which method ran (see
llm_jax/training/length_eval.py).
"""

from __future__ import annotations

import json

from absl import app, flags, logging

from llm_jax.cli import quiet_library_logs, run_reporting_errors
from llm_jax.errors import ConfigError
from llm_jax.training import length_eval
from llm_jax.training.length_eval import evaluate_checkpoint

_WORKDIR = flags.DEFINE_string("workdir", None, "run directory written by llm_jax.train")
_SPLIT = flags.DEFINE_string("split", None, "split to evaluate (default: the run's data.eval_split)")
_EVAL_STEPS = flags.DEFINE_integer("eval_steps", None, "batches to evaluate, -1 = the whole split with "
                                   "data.pipeline=grain (default: the run's train.eval_steps)")
_SEQ_LEN = flags.DEFINE_integer("seq_len", None, "evaluate on rows of this many tokens instead of the run's "
                                "data.seq_len (length generalisation; may exceed model.max_len)")
_LENGTH_METHOD = flags.DEFINE_enum("length_method", length_eval.AUTO,
                                   [length_eval.AUTO, *length_eval.LENGTH_METHODS.names()],
                                   "with --seq_len: direct, sliding_window (windows of model.max_len tokens), or auto "
                                   "(sliding_window for absolute-position tables past model.max_len, else direct)")
_STRIDE = flags.DEFINE_integer("stride", 0, "with --length_method=sliding_window: tokens between windows "
                               "(0 = model.max_len // 2)")
flags.mark_flag_as_required("workdir")

SOURCE_FIELDS = length_eval.SOURCE_FIELDS  # in each metrics.jsonl line evaluate appends (not sent to TensorBoard)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    quiet_library_logs()

    def evaluate_and_report() -> None:
        step, metrics, report, fields = evaluate_checkpoint(_WORKDIR.value, _SPLIT.value, _EVAL_STEPS.value,
                                                            _SEQ_LEN.value, _LENGTH_METHOD.value, _STRIDE.value)
        length_eval.append_eval_record(_WORKDIR.value, step, metrics, fields)
        logging.info("step %d | %s", step, metrics)
        if report:
            logging.info("step %d, split %s:\n%s", step, _SPLIT.value or "evaluation", report)
        print(json.dumps({"step": step, **metrics, **fields}))

    run_reporting_errors(evaluate_and_report, (ConfigError, FileNotFoundError, ValueError))


if __name__ == "__main__":
    app.run(main)
