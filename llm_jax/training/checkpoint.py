"""Checkpointing of the train state and the data-iterator state with Orbax.

Layout on disk (one directory per saved step)::

    WORKDIR/checkpoints/
        <step>/
            state/   # the train-state pytree (StandardCheckpointHandler / OCDBT)
            data/    # the data-iterator state of each process: process_<i>-of-<n>.json

All processes call `save` and `restore` (Orbax synchronises them and lets the primary host do the single-writer
parts); there is deliberately no process-0-only logic here. Each process's input pipeline reads its own shard,
so each writes its own iterator state (as Grain's own Orbax handler does). Orbax writes a step into a temporary
directory and renames it when complete, so a process killed during a save leaves the previous steps loadable.
Evaluation, sampling and export call `restore_params` on a read-only Checkpointer: it reads the parameters
alone, so a checkpoint saved by any number of processes restores in one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from absl import logging
from etils import epath

from llm_jax.errors import CheckpointError, ConfigError, one_line

__all__ = ["Checkpointer", "committed_steps", "STATE_ITEM", "DATA_ITEM", "CHECKPOINTS_DIR", "CORRUPT_DIR"]

STATE_ITEM = "state"
DATA_ITEM = "data"
CHECKPOINTS_DIR = "checkpoints"  # WORKDIR/checkpoints/<step>/
CORRUPT_DIR = "corrupt_checkpoints"  # beside checkpoints/: steps a fallback resume moved out of the way


def _absolute(directory: str | os.PathLike[str]) -> str:
    path = os.fspath(directory)
    if "://" in path:  # gs://, s3://, ... : already absolute, os.path would mangle it.
        return path
    return os.path.abspath(os.path.expanduser(path))


def committed_steps(directory: str) -> list[int]:
    """The steps saved completely under `directory`, ascending, read without Orbax (cheap, before any work):
    an unfinished save carries a temporary suffix and its state item is missing or renamed."""
    root = epath.Path(_absolute(directory))
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and (p / STATE_ITEM).is_dir())


def _process_file(index: int, count: int) -> str:
    return f"process_{index}-of-{count}.json"


class ProcessJsonHandler(ocp.CheckpointHandler):
    """One JSON file per process: the data-iterator state of that process's shard.

    Restoring with another process count works only when every saved state is the same (a step-indexed
    sampler); a sharded iterator's position cannot be redistributed, and the error says so.
    """

    def save(self, directory: epath.Path, args: "ProcessJsonSave") -> None:
        name = _process_file(jax.process_index(), jax.process_count())
        (directory / name).write_text(json.dumps(args.item, sort_keys=True))

    def restore(self, directory: epath.Path, args: "ProcessJsonRestore | None" = None) -> dict:
        own = directory / _process_file(jax.process_index(), jax.process_count())
        if own.exists():
            return json.loads(own.read_text())
        saved = sorted(directory.glob("process_*-of-*.json"))
        states = [json.loads(path.read_text()) for path in saved]
        if states and all(state == states[0] for state in states):
            return states[0]
        raise ConfigError(
            f"{directory} holds the data-iterator states of {len(saved)} processes "
            f"({', '.join(p.name for p in saved)}), this job has {jax.process_count()}: each process's input "
            "shard position cannot be moved to another process count; resume with the same number of processes")

    def metadata(self, directory: epath.Path) -> None:
        return None


@ocp.args.register_with_handler(ProcessJsonHandler, for_save=True)
@dataclasses.dataclass
class ProcessJsonSave(ocp.args.CheckpointArgs):
    item: dict


@ocp.args.register_with_handler(ProcessJsonHandler, for_restore=True)
@dataclasses.dataclass
class ProcessJsonRestore(ocp.args.CheckpointArgs):
    pass


class Checkpointer:
    """Orbax CheckpointManager under WORKDIR/checkpoints holding the train state and the data-iterator state.

    Local paths are made absolute (Orbax's tensorstore layer requires it); URLs such as gs://... are kept. At most
    `keep` steps stay on disk. With `async_save`, `save` returns once the arrays are copied to the host and a
    background thread writes them; `wait` or `close` blocks until the save is committed. A `read_only`
    Checkpointer (evaluate, generate, convert, llm_jax.load) never creates the directory and refuses to save.
    """

    def __init__(self, directory: str, *, keep: int, async_save: bool = True, read_only: bool = False):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self._directory = _absolute(directory)
        self._keep = keep
        self._async_save = async_save
        self._read_only = read_only
        self._writing: int | None = None  # the step of the latest save, possibly still being written
        self._manager = self._new_manager()

    def _new_manager(self) -> ocp.CheckpointManager:
        # The host loop decides when to save: an interval of 1 lets Orbax save every step it is asked to.
        options = ocp.CheckpointManagerOptions(max_to_keep=self._keep, save_interval_steps=1,
                                               enable_async_checkpointing=self._async_save,
                                               create=not self._read_only)
        return ocp.CheckpointManager(self._directory, item_names=(STATE_ITEM, DATA_ITEM), options=options)

    @property
    def directory(self) -> str:
        """The absolute checkpoint root directory."""
        return self._directory

    def all_steps(self) -> list[int]:
        """The committed steps, ascending, as read when the Checkpointer was created and tracked since."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest step, or None; with async_save a step is listed as soon as `save` returns (`wait` makes it
        durable). Saves made by other instances are not seen."""
        return self._manager.latest_step()

    def save(self, step: int, state: Any, data_state: Mapping[str, Any], *, force: bool = False) -> bool:
        """Saves `state` and `data_state` as checkpoint `step` (every process calls it); returns whether a save
        started. Orbax declines a step not newer than the latest unless `force`; an existing step raises
        StepAlreadyExistsError even with `force`."""
        if self._read_only:
            raise ValueError(f"this Checkpointer of {self._directory} is read-only: build one without read_only "
                             "to save")
        args = ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(state),
                                     DATA_ITEM: ProcessJsonSave(dict(data_state))})
        self.wait()  # Orbax waits for the previous async save anyway; its failure names that step
        self._writing = int(step)
        with self._storage_errors():
            return bool(self._manager.save(int(step), args=args, force=force))

    @contextlib.contextmanager
    def _storage_errors(self) -> Iterator[None]:
        """A full disk or a denied write while saving becomes a CheckpointError naming the step being written
        and the newest complete one (what a rerun resumes from); other errors keep their traceback."""
        try:
            yield
        except Exception as error:
            if not _is_storage_error(error):
                raise
            complete = [step for step in committed_steps(self._directory) if step != self._writing]
            resume = (f"the newest complete checkpoint is step {complete[-1]}: free space or fix the permissions, "
                      "then rerun to resume from it") if complete else (
                "there is no complete checkpoint yet: free space or fix the permissions, then rerun to start again")
            raise CheckpointError(f"writing checkpoint step {self._writing} under {self._directory} failed: "
                                  f"{_one_line(error)}; {resume}") from error

    def restore(self, step: int | None, abstract_state: Any) -> tuple[Any, dict]:
        """(state, data_state) of checkpoint `step` (None = the newest), with the shardings of `abstract_state`
        (ShapeDtypeStructs carrying .sharding), so a checkpoint restores onto another mesh.

        A missing step raises FileNotFoundError naming the directory; a step that cannot be read (truncated,
        corrupt or another model's) raises CheckpointError naming its directory and what is wrong.
        """
        step = self._committed_step(step)
        args = ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(abstract_state),
                                     DATA_ITEM: ProcessJsonRestore()})
        with self._restore_errors(step):
            restored = self._manager.restore(step, args=args)
        return restored[STATE_ITEM], dict(restored[DATA_ITEM])

    def restore_params(self, step: int | None, abstract_params: Any) -> tuple[int, Any]:
        """(the saved train step, params) of checkpoint `step` (None = the newest), with the shardings of
        `abstract_params`: what evaluation, sampling and export need.

        Only `step` and `params` of the state item are read, neither the optimizer state (no memory spent on
        it) nor the data-iterator states, so a checkpoint saved by N processes restores in one (`restore`
        insists on N). Errors as in `restore`.
        """
        step = self._committed_step(step)
        item = {"step": 0, "params": abstract_params}  # a subset of the saved TrainState's entries
        restore_args = {"step": ocp.RestoreArgs(restore_type=np.ndarray),
                        "params": ocp.checkpoint_utils.construct_restore_args(abstract_params)}
        args = ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
        reader = ocp.PyTreeCheckpointer()  # the state item alone, outside the manager (its handler is fixed)
        try:
            with self._restore_errors(step):
                restored = reader.restore(epath.Path(self._directory) / str(step) / STATE_ITEM, args=args)
        finally:
            reader.close()
        return int(restored["step"]), restored["params"]

    def _committed_step(self, step: int | None) -> int:
        """`step`, or the newest when None, once pending saves have committed; FileNotFoundError naming the
        directory (and the steps there) when it is not on disk."""
        self._manager.wait_until_finished()  # an in-flight async save is listed already: let it commit
        available = self.all_steps()
        if step is None and not available:
            raise FileNotFoundError(f"No checkpoint found in {self._directory!r}.")
        step = available[-1] if step is None else int(step)
        if step not in available:
            raise FileNotFoundError(f"No checkpoint for step {step} in {self._directory!r} "
                                    f"(available steps: {available}).")
        return step

    @contextlib.contextmanager
    def _restore_errors(self, step: int) -> Iterator[None]:
        """Any error reading checkpoint `step` becomes a CheckpointError naming its directory (Orbax and
        tensorstore raise many types for unreadable files); a ConfigError (the data states) passes."""
        try:
            yield
        except ConfigError:
            raise
        except Exception as error:
            raise CheckpointError(f"{os.path.join(self._directory, str(step))} cannot be restored: "
                                  f"{_one_line(error)}") from error

    def restore_newest(self, abstract_state: Any, *, fallback: bool) -> tuple[int, Any, dict]:
        """(step, state, data_state) of the newest checkpoint. When it cannot be restored and `fallback` is set,
        the next older one is tried, and the steps that failed are moved to WORKDIR/corrupt_checkpoints (a
        resumed run saves those step numbers again); without `fallback` the CheckpointError says what to do."""
        failed: list[int] = []
        for step in reversed(self.all_steps()):
            try:
                state, data_state = self.restore(step, abstract_state)
            except CheckpointError as error:
                if not fallback:
                    older = [s for s in self.all_steps() if s < step]
                    hint = (f"; pass --restore_fallback to resume from the newest that restores (older: {older})"
                            if older else "; no older checkpoint exists")
                    raise CheckpointError(f"{error}{hint}") from error.__cause__
                logging.warning("%s; trying the previous checkpoint", error)
                failed.append(step)
                continue
            self._set_aside(failed)
            return step, state, data_state
        raise CheckpointError(f"no checkpoint in {self._directory} can be restored (tried steps {failed}); move "
                              "the directory away to start afresh")

    def _set_aside(self, steps: list[int]) -> None:
        """Moves unreadable steps out of checkpoints/ (kept for inspection) and re-reads the step list."""
        if not steps:
            return
        if jax.process_index() == 0:
            target = os.path.join(os.path.dirname(self._directory), CORRUPT_DIR)
            os.makedirs(target, exist_ok=True)
            for step in steps:
                moved = os.path.join(target, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
                shutil.move(os.path.join(self._directory, str(step)), moved)
                logging.warning("moved unreadable checkpoint step %d to %s", step, moved)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("llm_jax: unreadable checkpoints set aside")
        self._manager.close()
        self._manager = self._new_manager()

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are committed (and old ones deleted)."""
        with self._storage_errors():
            self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager's resources."""
        with self._storage_errors():
            self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def _is_storage_error(error: BaseException) -> bool:
    """ENOSPC, EACCES, EROFS, EDQUOT... from Python, or tensorstore's RESOURCE_EXHAUSTED / PERMISSION_DENIED."""
    for cause in (error, error.__cause__, error.__context__):
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT,
                                                          errno.EPERM, errno.EIO):
            return True
        if cause is not None and any(code in str(cause) for code in ("RESOURCE_EXHAUSTED", "PERMISSION_DENIED",
                                                                       "No space left on device")):
            return True
    return False


def _one_line(error: BaseException) -> str:
    text = one_line(error)
    return f"{type(error).__name__}: {text[:400]}{'...' if len(text) > 400 else ''}"
