"""What the absl entry points share: quiet third-party INFO logs, errors users can act on, and the check that a
--workdir holds a run (the experiment-file flag is `llm_jax.experiment_files`).

A hostile input ends with one line naming the file or key: `run_reporting_errors` turns a UserError into
`error: ...`.
"""

from __future__ import annotations

import logging as std_logging
import os
import re
import sys
from typing import Any, Callable

from absl import logging

from llm_jax.errors import UserError, WorkdirError, one_line

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class _OwnInfoOnly(std_logging.Filter):
    """Keeps llm_jax's own INFO lines and every library's warnings (Orbax logs ~50 INFO lines per save), and
    shortens a library's logged exception to its message line: a failed background checkpoint write (e.g. a
    full disk) is reported once, as a one-line error, by the code that waits for it."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        own = record.pathname.startswith(_PACKAGE_DIR)
        if not own and record.exc_info:
            error = record.exc_info[1]
            record.msg, record.args = f"{record.getMessage()} ({type(error).__name__}: {error})", None
            record.exc_info, record.exc_text = None, None
        return record.levelno >= std_logging.WARNING or own


def quiet_library_logs() -> None:
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_OwnInfoOnly())
    sys.unraisablehook = _drop_closed_loop_callbacks


def _drop_closed_loop_callbacks(unraisable: Any) -> None:
    """Tensorstore completes reads of a failed Orbax restore after Orbax closed its event loop; each completion
    would print a 'RuntimeError: Event loop is closed' traceback under the one-line error. Others print as usual."""
    error = unraisable.exc_value
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
        return
    sys.__unraisablehook__(unraisable)


def run_reporting_errors(main: Callable[[], object], expected: tuple[type[BaseException], ...] = ()) -> None:
    """Runs `main`; a UserError (or another `expected` error) becomes a one-line message and exit status 1, not
    a traceback (a message that wraps another library's multi-line text is joined into one line)."""
    try:
        main()
    except (UserError, *expected) as error:
        message = re.sub(r"\s*\n\s*", " ", str(error).strip())
        raise SystemExit(f"error: {message}") from None


# ----------------------------------------------------------------------------- work directories


def check_saved_run(workdir: str) -> None:
    """Fails in one line, before any model is built, when `workdir` is not a run that evaluate, generate or
    convert --to can read: no such directory, no readable DIR/config.json, or no complete checkpoint."""
    from llm_jax.training import run_record
    from llm_jax.training.checkpoint import CHECKPOINTS_DIR, committed_steps

    hint = "--workdir must be a directory written by llm_jax.train or llm_jax.convert"
    if not os.path.isdir(workdir):
        what = "it is a file" if os.path.exists(workdir) else "it does not exist"
        raise WorkdirError(f"--workdir={workdir} is not a directory ({what}); {hint}")
    path = os.path.join(workdir, run_record.CONFIG_FILE)
    if run_record.read_record(workdir) is None:
        raise WorkdirError(f"{path} does not exist: {hint}")
    try:
        run_record.read_run_config(workdir)
    except (ValueError, TypeError, KeyError, AttributeError) as error:  # an edited record: entries of other types
        raise WorkdirError(f"{path} is not a readable run record ({type(error).__name__}: {one_line(error)}): "
                           "restore the file written by llm_jax.train, or use another --workdir") from error
    if not committed_steps(os.path.join(workdir, CHECKPOINTS_DIR)):
        raise WorkdirError(f"{os.path.join(workdir, CHECKPOINTS_DIR)} holds no complete checkpoint: train the run "
                           "(python -m llm_jax.train --workdir=...) until it saves one, or use another --workdir")
