"""Errors a user can act on; every entry point turns them into one line and a non-zero exit.

Each message names the key, file or directory that is wrong and what to do. Anything else that escapes an entry
point is a programming error and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Base of the errors caused by input (config, files, work directory), not by a bug."""


class ConfigError(UserError, ValueError):
    """A config value that cannot work; the message names the key and what to do."""


class WorkdirError(UserError):
    """The work directory cannot be used: held by another command, unwritable, or holding another run."""


class MetricsFileError(WorkdirError, ValueError):
    """DIR/metrics.jsonl holds a line that is not a metrics record (edited or corrupted); names PATH:LINE."""


class CheckpointError(UserError):
    """A checkpoint that cannot be restored; the message names its step directory and what is wrong."""


class TrainingDivergedError(UserError, RuntimeError):
    """The loss or gradient became NaN or Inf; the message names the step and the last good checkpoint."""


def one_line(text: object) -> str:
    """`text` with every run of whitespace (newlines included) as one space: messages end as one line."""
    return " ".join(str(text).split())
