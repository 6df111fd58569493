"""`--profile_steps=A:B`: a jax.profiler trace of optimizer updates A+1..B written to DIR/profile/.

The loop dispatches whole chunks of train.steps_per_dispatch updates (cut at log / eval / checkpoint steps),
so the window widens to the chunks that hold those updates: the trace starts before the chunk that holds
update A+1 and stops after the chunk that completes update B has finished, and the log says which updates
were traced. A window that starts at 0 includes the first chunk's compilation.

View it with TensorBoard's profile plugin (`tensorboard --logdir DIR/profile`) or open
DIR/profile/plugins/profile/RUN/perfetto_trace.json.gz in https://ui.perfetto.dev.

A flag and not a config key: tracing is a question asked of one invocation, not a property of the run; it
changes nothing that is trained and is not saved in DIR/config.json or checked on resume.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from typing import Any

import jax
from absl import logging

from llm_jax.errors import UserError

PROFILE_DIR = "profile"
_WINDOW = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


class ProfileStepsError(UserError, ValueError):
    """--profile_steps is not a window of updates this run has; the message says what to pass."""


@dataclasses.dataclass(frozen=True)
class ProfileWindow:
    """Updates start+1..stop (step numbers count completed updates, so A:B reads 'from step A to step B')."""

    start: int
    stop: int

    @classmethod
    def parse(cls, text: str) -> "ProfileWindow":
        match = _WINDOW.match(text or "")
        if not match:
            raise ProfileStepsError(f"--profile_steps={text!r} is not A:B with whole numbers 0 <= A < B, e.g. "
                                    "--profile_steps=20:30 traces updates 21 to 30")
        start, stop = int(match.group(1)), int(match.group(2))
        if start >= stop:
            raise ProfileStepsError(f"--profile_steps={text}: A={start} must be below B={stop}; e.g. "
                                    f"--profile_steps={start}:{start + 10}")
        return cls(start, stop)

    def check(self, total_steps: int) -> None:
        """Fails before anything is compiled when the window starts at or after the run's end."""
        if self.start >= total_steps:
            raise ProfileStepsError(f"--profile_steps={self.start}:{self.stop} starts at or after train.steps="
                                    f"{total_steps}: pick A < {total_steps}")


class StepProfiler:
    """Starts and stops one jax.profiler trace around the chunks that hold the window's updates. Each hook
    returns the seconds it spent starting or writing the trace, which the loop leaves out of tokens/s."""

    def __init__(self, window: ProfileWindow, workdir: str):
        self.window, self.directory = window, os.path.join(workdir, PROFILE_DIR)
        self.first: int | None = None  # the step the trace started at
        self.last: int | None = None  # the step the last traced chunk ends at
        self.done = False

    @property
    def active(self) -> bool:
        return self.first is not None and not self.done

    def before_dispatch(self, step: int, stop: int) -> float:
        """Called before loading and dispatching the chunk of updates step+1..stop."""
        if self.first is not None or self.done or not (step < self.window.stop and stop > self.window.start):
            return 0.0
        start = time.perf_counter()
        self.first = step
        logging.info("profiling from step %d (--profile_steps=%d:%d, widened to whole dispatches) into %s",
                     step, self.window.start, self.window.stop, self.directory)
        jax.profiler.start_trace(self.directory, create_perfetto_trace=True)
        return time.perf_counter() - start

    def after_dispatch(self, stop: int, state: Any) -> float:
        """Called after dispatching the chunk that ends at `stop`; ends the trace once it covers the window."""
        if not self.active:
            return 0.0
        self.last = stop
        return self.finish(state) if stop >= self.window.stop else 0.0

    def finish(self, state: Any, wait: bool = True) -> float:
        """Waits for `state` (the traced chunks' device work, counted as training time; not when the run
        failed) and writes the trace. A run that ends inside the window (train.steps, a signal, an error)
        writes what it traced."""
        if not self.active:
            return 0.0
        if wait:
            jax.block_until_ready(state)
        start = time.perf_counter()
        jax.profiler.stop_trace()
        self.done = True
        last = self.last if self.last is not None else self.first
        logging.info("profiled updates %d-%d (from step %d to step %d) into %s", self.first + 1, last, self.first,
                     last, self.directory)
        return time.perf_counter() - start

    def skipped(self, start: int) -> bool:
        """True (with a warning) when a resumed run already holds every step of the window."""
        if start >= self.window.stop:
            logging.warning("--profile_steps=%d:%d: the run resumes at step %d, after the window; nothing is "
                            "traced", self.window.start, self.window.stop, start)
            return True
        return False
