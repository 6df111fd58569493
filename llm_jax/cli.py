"""What the absl entry points share: quiet third-party INFO logs, and errors users can act on."""

from __future__ import annotations

import logging as std_logging
import os
from typing import Callable

from absl import logging

from llm_jax.errors import UserError

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class _OwnInfoOnly(std_logging.Filter):
    """Keeps llm_jax's own INFO lines and every library's warnings; Orbax logs ~50 INFO lines per save."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or record.pathname.startswith(_PACKAGE_DIR)


def quiet_library_logs() -> None:
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_OwnInfoOnly())


def run_reporting_errors(main: Callable[[], object], expected: tuple[type[BaseException], ...] = ()) -> None:
    """Runs `main`; a UserError (or another `expected` error) becomes a one-line message and exit status 1, not
    a traceback."""
    try:
        main()
    except (UserError, *expected) as error:
        logging.error("%s", error)
        raise SystemExit(f"error: {error}") from None
