"""Checkpointing of the train state and the data-iterator state with Orbax.

Layout on disk (one directory per saved step)::

    WORKDIR/checkpoints/
        <step>/
            state/   # the train-state pytree (StandardCheckpointHandler / OCDBT)
            data/    # the data-iterator state of each process: process_<i>-of-<n>.json

All processes must call :meth:`Checkpointer.save` and :meth:`Checkpointer.restore`
(Orbax synchronises the processes and lets the primary host do the single-writer
parts); there is deliberately no process-0-only logic here. Each process's input
pipeline reads its own shard, so each writes its own iterator state (as Grain's own
Orbax handler does).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from llm_jax.errors import ConfigError

__all__ = ["Checkpointer", "STATE_ITEM", "DATA_ITEM"]

STATE_ITEM = "state"
DATA_ITEM = "data"


def _absolute(directory: str | os.PathLike[str]) -> str:
    path = os.fspath(directory)
    if "://" in path:  # gs://, s3://, ... : already absolute, os.path would mangle it.
        return path
    return os.path.abspath(os.path.expanduser(path))


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

    Args:
      directory: root directory for the checkpoints (e.g. ``WORKDIR/checkpoints``).
        Local paths are made absolute here (Orbax's tensorstore layer raises
        "Checkpoint path should be absolute" at save time otherwise); URLs such
        as ``gs://...`` are left as they are. Created if missing.
      keep: keep at most this many checkpoints; the oldest are deleted once a
        newer one is committed. Must be >= 1.
      async_save: if True, :meth:`save` returns once the arrays have been copied
        device->host and the files are written by a background thread; call
        :meth:`wait` (or :meth:`close`) to block until the save is committed.
    """

    def __init__(self, directory: str, *, keep: int, async_save: bool = True):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self._directory = _absolute(directory)
        self._keep = keep
        self._async_save = async_save
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            # The host loop decides when to save: an interval of 1 means Orbax's
            # FixedIntervalPolicy agrees to every step it is asked to save.
            save_interval_steps=1,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self._directory,
            item_names=(STATE_ITEM, DATA_ITEM),
            options=options,
        )

    @property
    def directory(self) -> str:
        """The absolute checkpoint root directory."""
        return self._directory

    def all_steps(self) -> list[int]:
        """All steps known to the manager, ascending (see :meth:`latest_step`)."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest saved step, or None if there is no checkpoint.

        With ``async_save`` a step is listed as soon as :meth:`save` returns,
        i.e. possibly before it is committed; :meth:`wait` makes it durable.
        The list is read from disk when the Checkpointer is created and then
        tracked in memory (it does not see saves made by other instances).
        """
        return self._manager.latest_step()

    def save(
        self,
        step: int,
        state: Any,
        data_state: Mapping[str, Any],
        *,
        force: bool = False,
    ) -> bool:
        """Saves ``state`` and ``data_state`` as checkpoint ``step``.

        Every process must call this. With ``async_save`` the call returns after
        the device->host copy and the write continues in the background (a
        subsequent save first waits for the previous one to commit).

        Returns whether a save was started. Orbax declines (returns False) a
        ``step`` that is not newer than the latest checkpoint unless ``force``
        is given; ``force`` also bypasses any save-interval policy. Saving a step
        that already exists raises
        ``orbax.checkpoint.checkpoint_manager.StepAlreadyExistsError`` even with
        ``force``.
        """
        args = ocp.args.Composite(
            **{
                STATE_ITEM: ocp.args.StandardSave(state),
                DATA_ITEM: ProcessJsonSave(dict(data_state)),
            }
        )
        return bool(self._manager.save(int(step), args=args, force=force))

    def restore(self, step: int | None, abstract_state: Any) -> tuple[Any, dict]:
        """Restores checkpoint ``step`` (None = latest).

        ``abstract_state`` is a pytree matching the saved state whose leaves are
        ``jax.ShapeDtypeStruct`` carrying ``.sharding`` (e.g. ``jax.eval_shape``
        of the init function with the target shardings attached). The arrays come
        back with exactly those shardings, so a checkpoint can be restored onto a
        different mesh. Returns ``(state, data_state)``.

        Raises FileNotFoundError (naming the directory) if there is no
        checkpoint, or if ``step`` is given but not present.
        """
        # The manager lists an in-flight async save as a step already; make sure
        # whatever we might restore is committed first (no-op when idle).
        self._manager.wait_until_finished()
        available = sorted(self._manager.all_steps())
        if step is None:
            if not available:
                raise FileNotFoundError(f"No checkpoint found in {self._directory!r}.")
            step = available[-1]
        else:
            step = int(step)
            if step not in available:
                raise FileNotFoundError(
                    f"No checkpoint for step {step} in {self._directory!r} "
                    f"(available steps: {available})."
                )
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                **{
                    STATE_ITEM: ocp.args.StandardRestore(abstract_state),
                    DATA_ITEM: ProcessJsonRestore(),
                }
            ),
        )
        return restored[STATE_ITEM], dict(restored[DATA_ITEM])

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are committed (and old ones deleted)."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager's resources."""
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
