"""Trains, evaluates and checkpoints; re-running with the same --workdir resumes.

    python -m llm_jax.train --config=experiments/shakespeare_char.py --workdir=runs/shakespeare_char
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from llm_jax.cli import quiet_library_logs, run_reporting_errors
from llm_jax.config import ConfigError
from llm_jax.training.loop import TrainingDivergedError, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment file, e.g. experiments/shakespeare_char.py[:arg]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory: config.json, metrics, checkpoints")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    quiet_library_logs()
    run_reporting_errors(lambda: train(_CONFIG.value, _WORKDIR.value), (ConfigError, TrainingDivergedError))


if __name__ == "__main__":
    app.run(main)
