"""DIR/config.json: what a run is, kept across resumes.

The file holds the config of the run's first start, its resolved model config and provenance, then one entry
per later start with the keys that start changed and its own provenance. Every reader (evaluate, generate,
convert, sweeps) uses the config in force now: the first config with every start's changes applied. A resume
that would change what is trained (parameters, optimizer state, data stream) is refused before any work,
naming the keys, unless the user allows it.
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any

import ml_collections

from llm_jax import config as config_lib
from llm_jax.errors import ConfigError, WorkdirError
from llm_jax.models.layer_layout import check_layout_unchanged
from llm_jax.models.model_config import ModelConfig, model_config_from_json, model_config_to_json

CONFIG_FILE = "config.json"

Changes = dict[str, list[Any]]  # "section.key" -> [value before, value now]


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def read_record(workdir: str) -> dict[str, Any] | None:
    """The parsed DIR/config.json, or None when the directory holds no run yet."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        _check_shape(record)
        return record
    except (OSError, ValueError) as error:
        raise WorkdirError(f"{path} is not a run record ({error}): it was not written by llm_jax.train or "
                           "llm_jax.convert, or it was damaged; move it away to start this directory afresh") from None


def _check_shape(record: Any) -> None:
    """ValueError naming the first entry that is not what train and convert write."""
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        raise ValueError("no 'config' object")
    if not isinstance(record.get("model_config"), dict):
        raise ValueError("no 'model_config' object")
    starts = record.get("starts", [])
    if not isinstance(starts, list) or not all(isinstance(start, dict) and isinstance(start.get("changes", {}), dict)
                                               for start in starts):
        raise ValueError("'starts' is not a list of objects with 'changes'")


def _write(workdir: str, record: dict[str, Any]) -> None:
    """Replaces DIR/config.json atomically: a crash leaves the old record or the new one."""
    path = os.path.join(workdir, CONFIG_FILE)
    temporary = f"{path}.tmp.{os.getpid()}"
    try:
        os.makedirs(workdir, exist_ok=True)
        with open(temporary, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except OSError as error:
        raise WorkdirError(f"cannot write {path}: {error.strerror or error}; make the work directory writable "
                           "(and check the disk has space)") from None


def write_first_start(workdir: str, config: ml_collections.ConfigDict, model_config: ModelConfig,
                      provenance: dict[str, Any]) -> None:
    """A new run's record: its config, model config and provenance, and no later starts."""
    _write(workdir, {"config": config_lib.config_to_dict(config), "model_config": model_config_to_json(model_config),
                     "provenance": provenance, "starts": []})


def append_start(workdir: str, record: dict[str, Any], step: int, changes: Changes, model_config: ModelConfig,
                 provenance: dict[str, Any]) -> None:
    """Adds a resumed start to the record: the step it resumed from, what it changed, where it ran."""
    start: dict[str, Any] = {"time": _now(), "resumed_from_step": step, "changes": changes, "provenance": provenance}
    resolved = model_config_to_json(model_config)
    if resolved != _latest_model_config(record):
        start["model_config"] = resolved
    _write(workdir, {**record, "starts": [*record.get("starts", []), start]})


def _latest_model_config(record: dict[str, Any]) -> dict[str, Any]:
    configs = [start["model_config"] for start in record.get("starts", []) if "model_config" in start]
    return configs[-1] if configs else record["model_config"]


def config_in_force(record: dict[str, Any]) -> ml_collections.ConfigDict:
    """The first start's config with each later start's changes applied, in order."""
    config = config_lib.config_from_dict(record["config"])
    for start in record.get("starts", []):
        changed = {key: values[1] for key, values in start.get("changes", {}).items()}
        config = config_lib.config_from_dict(_apply(config_lib.config_to_dict(config), changed))
    return config


def _apply(values: dict[str, Any], changed: dict[str, Any]) -> dict[str, Any]:
    for dotted, value in changed.items():
        section, _, name = dotted.partition(".")
        values.setdefault(section, {})[name] = value
    return values


def read_run_config(workdir: str) -> tuple[ml_collections.ConfigDict, ModelConfig]:
    """The config and model config in force for the run in DIR (what evaluate, generate and convert build)."""
    record = read_record(workdir)
    if record is None:
        raise FileNotFoundError(f"{os.path.join(workdir, CONFIG_FILE)} does not exist: --workdir must be a "
                                "directory written by llm_jax.train or llm_jax.convert")
    return config_in_force(record), model_config_from_json(_latest_model_config(record))


def saved_padded_vocab(record: dict[str, Any]) -> int | None:
    """The embedding rows of the saved parameters: a resume keeps them whatever the mesh."""
    return _latest_model_config(record).get("padded_vocab_size")


def _flatten(config: ml_collections.ConfigDict) -> dict[str, Any]:
    values = json.loads(json.dumps(config_lib.config_to_dict(config), default=str))
    return {f"{section}.{name}": value for section, keys in values.items() for name, value in keys.items()}


def config_changes(before: ml_collections.ConfigDict, now: ml_collections.ConfigDict) -> Changes:
    """The keys whose values differ, as JSON values [before, now]."""
    old, new = _flatten(before), _flatten(now)
    return {key: [old.get(key), new[key]] for key in new if old.get(key) != new[key]}


def _is_free(dotted: str) -> bool:
    section, _, name = dotted.partition(".")
    return config_lib.SCHEMA[section][name].free_on_resume


def check_resume(record: dict[str, Any], config: ml_collections.ConfigDict, workdir: str,
                 allow_config_change: bool) -> Changes:
    """The changes this start makes to the run in force; raises ConfigError, before any work, when one would
    change the parameters, the optimizer state or the data stream and `allow_config_change` is False."""
    changes = config_changes(config_in_force(record), config)
    check_layout_unchanged(changes, workdir)  # the checkpoint's trees cannot take the other layout
    guarded = sorted(key for key in changes if not _is_free(key))
    if guarded and not allow_config_change:
        listed = "; ".join(f"{key}: {changes[key][0]!r} -> {changes[key][1]!r}" for key in guarded)
        raise ConfigError(f"{workdir} holds a run trained with other settings ({listed}); these change the "
                          "parameters, the optimizer state or the data stream. Resume with the run's settings, use "
                          "another --workdir, or pass --allow_config_change to resume anyway")
    return changes


def schedule_notes(changes: Changes, config: ml_collections.ConfigDict) -> list[str]:
    """What a free change does beyond the obvious, e.g. a new train.steps moving the learning-rate decay."""
    notes = []
    if "train.steps" in changes and config.optimizer.decay_steps is None and config.optimizer.schedule != "constant":
        before, now = changes["train.steps"]
        notes.append(f"train.steps {before} -> {now}: optimizer.decay_steps follows train.steps, so the "
                     "learning-rate schedule changes from the resumed step on (set optimizer.decay_steps to keep it)")
    return notes
