"""The experiment-file flag, --config=FILE[:arg], with errors in one line.

`define_experiment_flag` is ml_collections' `DEFINE_config_file` (a locked config, --config.key=value overrides)
whose parser loads the file itself: a missing or broken file, a failing get_config and a misspelt override key
each raise a ConfigError (a ValueError) naming the file or key, which absl reports as one
`FATAL Flags parsing error: flag --config=...: ...` line before any work (with a "did you mean" for keys).
"""

from __future__ import annotations

import difflib
import importlib.machinery
import importlib.util
import os
import re
import sys
import traceback
import types
from typing import Any, Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

from llm_jax.errors import ConfigError, one_line

flags.disclaim_key_flags()  # flags defined through define_experiment_flag belong to the entry point


def _raised(error: BaseException, path: str) -> str:
    """'ErrorType: message (at FILE:LINE)': the error and the deepest line of the experiment file it passed."""
    lines = [frame.lineno for frame in traceback.extract_tb(error.__traceback__)
             if os.path.abspath(frame.filename) == os.path.abspath(path)]
    where = f" (at {path}:{lines[-1]})" if lines else ""
    return f"{type(error).__name__}: {one_line(error)}{where}"


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
                          f"({one_line(error.msg)})") from None
    except OSError as error:
        sys.modules.pop(name, None)
        raise ConfigError(f"experiment file {path} cannot be read ({error.strerror or error})") from None
    except Exception as error:  # noqa: BLE001 - the user's file failed: report it, and where, in one line
        sys.modules.pop(name, None)
        if isinstance(error, ValueError) and "null bytes" in str(error):
            raise ConfigError(f"experiment file {path}: not valid Python ({one_line(error)})") from None
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
