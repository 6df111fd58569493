"""What the absl entry points share: quiet third-party INFO logs, errors users can act on, the experiment-file
flag (--config=FILE[:arg]) and the check that a --workdir holds a run.

A hostile input ends with one line naming the file or key: `run_reporting_errors` turns a UserError into
`error: ...`, and the experiment flag's parser raises ConfigError (a ValueError), which absl reports as one
`FATAL Flags parsing error: flag --config=...: ...` line before any work.
"""

from __future__ import annotations

import difflib
import importlib.machinery
import importlib.util
import logging as std_logging
import os
import re
import sys
import traceback
import types
from typing import Any, Callable, Sequence

import ml_collections
from absl import flags, logging
from ml_collections import config_flags

from llm_jax.errors import ConfigError, UserError, WorkdirError

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
flags.disclaim_key_flags()  # flags defined through define_experiment_flag belong to the entry point


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


# ----------------------------------------------------------------------------- experiment files (--config=FILE[:arg])


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _raised(error: BaseException, path: str) -> str:
    """'ErrorType: message (at FILE:LINE)': the error and the deepest line of the experiment file it passed."""
    lines = [frame.lineno for frame in traceback.extract_tb(error.__traceback__)
             if os.path.abspath(frame.filename) == os.path.abspath(path)]
    where = f" (at {path}:{lines[-1]})" if lines else ""
    return f"{type(error).__name__}: {_one_line(error)}{where}"


def _experiment_module(path: str) -> types.ModuleType:
    """Executes the experiment file at `path` as a module (as ml_collections' config_flags does), naming the
    file when it is missing, a directory, not Python, or fails while it is imported."""
    if not os.path.exists(path):
        raise ConfigError(f"experiment file {path} does not exist (working directory {os.getcwd()}); pass "
                          "--config=experiments/NAME.py[:variant]")
    if not os.path.isfile(path):
        raise ConfigError(f"experiment file {path} is not a file; pass --config=experiments/NAME.py[:variant]")
    name = "llm_jax_experiment_" + re.sub(r"\W", "_", os.path.abspath(path))
    loader = importlib.machinery.SourceFileLoader(name, path)
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader))
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    try:
        loader.exec_module(module)
    except SyntaxError as error:  # also invalid UTF-8; null bytes are a SyntaxError or ValueError by version
        sys.modules.pop(name, None)
        raise ConfigError(f"experiment file {error.filename or path}:{error.lineno or 1}: not valid Python "
                          f"({_one_line(error.msg)})") from None
    except OSError as error:
        sys.modules.pop(name, None)
        raise ConfigError(f"experiment file {path} cannot be read ({error.strerror or error})") from None
    except Exception as error:  # noqa: BLE001 - the user's file failed: report it, and where, in one line
        sys.modules.pop(name, None)
        if isinstance(error, ValueError) and "null bytes" in str(error):
            raise ConfigError(f"experiment file {path}: not valid Python ({_one_line(error)})") from None
        raise ConfigError(f"experiment file {path} raised {_raised(error, path)} while it was imported") from error
    return module


def load_experiment(argument: str) -> ml_collections.ConfigDict:
    """The locked config of an experiment argument 'FILE[:arg]': FILE's get_config(arg), or get_config() without
    ':arg'. Every way this can fail is a one-line ConfigError naming the file."""
    path, colon, arg = argument.partition(":")
    if not path:
        raise ConfigError(f"--config={argument!r} names no experiment file; pass "
                          "--config=experiments/NAME.py[:variant]")
    get_config = getattr(_experiment_module(path), "get_config", None)
    if not callable(get_config):
        raise ConfigError(f"experiment file {path} defines no get_config(): an experiment returns its config from "
                          "`def get_config(arg=None)`")
    call = f"get_config({arg!r})" if colon else "get_config()"
    try:
        config = get_config(arg) if colon else get_config()
    except Exception as error:  # noqa: BLE001 - the user's code failed: report it, and where, in one line
        raise ConfigError(f"experiment file {path}: {call} raised {_raised(error, path)}") from error
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"experiment file {path}: {call} returned {type(config).__name__}, not a ConfigDict: "
                          "start from llm_jax.config.default_config() and return it")
    config.lock()
    return config


def _config_paths(config: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a ConfigDict, sections included."""
    paths = []
    for key in config.keys():
        paths.append(prefix + key)
        if isinstance(config[key], ml_collections.ConfigDict):
            paths += _config_paths(config[key], f"{prefix}{key}.")
    return paths


def _has_path(config: Any, dotted: str) -> bool:
    node = config
    for part in re.sub(r"\[[^\]]*\]", "", dotted).split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return False
        node = node[part]
    return True


def check_overrides(config: ml_collections.ConfigDict, argv: Sequence[str], name: str = "config") -> None:
    """Every --NAME.key=value of `argv` must set an existing key: a misspelt one is a ConfigError naming it (and
    the closest key), instead of the AttributeError traceback config_flags gives."""
    pattern = re.compile(rf"^--?(?:no)?{re.escape(name)}\.([^=]+)")
    for arg in argv:
        match = pattern.match(arg)
        if match is None or _has_path(config, match.group(1)):
            continue
        dotted = match.group(1)
        close = difflib.get_close_matches(dotted, _config_paths(config), n=1)
        hint = f" (did you mean --{name}.{close[0]}?)" if close else ""
        raise ConfigError(f"--{name}.{dotted}: {dotted} is not a config key{hint}; see docs/config.md")


class ExperimentFileParser(flags.ArgumentParser):
    """The parser of an experiment flag, in place of config_flags' own: `load_experiment`, then `check_overrides`
    on the command line. A ConfigError is a ValueError, which absl reports as one 'FATAL Flags parsing error'
    line (config_flags' parser defers a missing file to a traceback at first use, and shows others' tracebacks)."""

    def __init__(self, name: str, sys_argv: Sequence[str] | None = None):
        self.name = name
        self._sys_argv = sys_argv

    def flag_type(self) -> str:
        return "config object"

    def parse(self, argument: Any) -> ml_collections.ConfigDict:
        if isinstance(argument, ml_collections.ConfigDict):  # a default or a programmatic value
            return argument
        config = load_experiment(str(argument))
        argv = sys.argv if self._sys_argv is None else self._sys_argv
        check_overrides(config, flags.FLAGS.read_flags_from_files(list(argv), force_gnu=False), self.name)
        return config


def define_experiment_flag(name: str, help_string: str, flag_values: flags.FlagValues = flags.FLAGS,
                           sys_argv: Sequence[str] | None = None) -> flags.FlagHolder:
    """`config_flags.DEFINE_config_file(name, ...)` (locked, --NAME.key=value overrides) whose file and override
    errors are one line naming the file or key; `sys_argv` as in config_flags (tests pass their own)."""
    holder = config_flags.DEFINE_config_file(name, None, help_string, flag_values=flag_values, lock_config=True,
                                             sys_argv=sys_argv)
    flag_values[name].parser = ExperimentFileParser(name, sys_argv)
    return holder


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
        raise WorkdirError(f"{path} is not a readable run record ({type(error).__name__}: {_one_line(error)}): "
                           "restore the file written by llm_jax.train, or use another --workdir") from error
    if not committed_steps(os.path.join(workdir, CHECKPOINTS_DIR)):
        raise WorkdirError(f"{os.path.join(workdir, CHECKPOINTS_DIR)} holds no complete checkpoint: train the run "
                           "(python -m llm_jax.train --workdir=...) until it saves one, or use another --workdir")
