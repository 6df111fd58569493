"""train.init_from: start a run from the weights of another work directory (a run, or an llm_jax.convert import).

The source's parameters are read on the host from its latest checkpoint without building its model;
`merge_params` copies every parameter the two models share (same path, same shape), keeps the ones the source
lacks as initialised (new task heads) and reports the source's parameters this model has no place for (its
old heads). Either layer layout (model.scan_layers) loads into either: both trees are compared looped
(`block_{i}`) and the result takes the target's layout. Every process reads the whole tree and then places its
own shards.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from llm_jax.errors import ConfigError
from llm_jax.models import layer_layout
from llm_jax.models.model_config import ModelConfig
from llm_jax.training.checkpoint import CHECKPOINTS_DIR, STATE_ITEM, committed_steps
from llm_jax.training.optimizer import param_path
from llm_jax.training.run_record import CONFIG_FILE

# Parameters with a vocabulary axis, which each run pads for its own vocabulary-sharding mesh axes
# (models.model_config.padded_vocab).
VOCAB_AXES = {"token_embedding/embedding": 0, "mlm_head/output_bias": 0,
              "output_head/dense/kernel": 1, "output_head/dense/bias": 0}


def _read_model_config(root: epath.Path, workdir: str) -> dict[str, Any]:
    path = root / CONFIG_FILE
    if not path.exists():
        raise ConfigError(f"train.init_from={workdir} has no {CONFIG_FILE} ({path}): give a work directory written "
                          "by llm_jax.train or llm_jax.convert")
    try:
        return dict(json.loads(path.read_text())["model_config"])
    except (ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"train.init_from={workdir}: {path} is not a run config with a 'model_config' entry "
                          f"({type(error).__name__}: {error})") from None


def _latest_state_dir(root: epath.Path, workdir: str) -> epath.Path:
    """DIR/checkpoints/STEP/state of the newest finished save (unfinished saves carry a temporary suffix)."""
    checkpoints = root / CHECKPOINTS_DIR
    steps = committed_steps(str(checkpoints))
    if not steps:
        raise ConfigError(f"train.init_from={workdir} has no checkpoint ({checkpoints}/STEP/{STATE_ITEM} missing): "
                          "train that run first, or point at another work directory")
    return checkpoints / str(max(steps)) / STATE_ITEM


def _restore_params(state_dir: epath.Path, workdir: str) -> dict[str, Any]:
    """Just the `params` subtree of the saved TrainState, as numpy arrays (partial restore, no target model)."""
    checkpointer = ocp.PyTreeCheckpointer()
    try:
        metadata = checkpointer.metadata(state_dir)
        tree = getattr(getattr(metadata, "item_metadata", metadata), "tree", metadata)
        if not isinstance(tree, Mapping) or "params" not in tree:
            raise ValueError(f"no 'params' entry in the saved state (entries: {sorted(tree or ())})")
        as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree["params"])
        restored = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
            item={"params": tree["params"]}, restore_args={"params": as_numpy}, partial_restore=True))
    except ConfigError:
        raise
    except Exception as error:  # noqa: BLE001 - Orbax and tensorstore raise many kinds; all mean "unreadable"
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ConfigError(f"train.init_from={workdir}: cannot read the checkpoint {state_dir} "
                          f"({type(error).__name__}: {reason})") from error
    finally:
        checkpointer.close()
    return restored["params"]


def read_source_params(workdir: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(params as nested dicts of numpy arrays, the model config as saved in DIR/config.json) of DIR's latest
    checkpoint."""
    root = epath.Path(os.path.abspath(workdir))  # Orbax reads no item metadata through a relative path
    if not root.is_dir():
        raise ConfigError(f"train.init_from={workdir} is not a directory: give the work directory of a run (or of "
                          "llm_jax.convert)")
    model_config = _read_model_config(root, workdir)
    return _restore_params(_latest_state_dir(root, workdir), workdir), model_config


def _shape_error(source_dir: str, path: str, source_shape: tuple, target_shape: tuple) -> ConfigError:
    return ConfigError(f"train.init_from={source_dir}: parameter {path} has shape {source_shape} there and "
                       f"{target_shape} in this run; the model sizes (model.d_model, num_heads, d_ff, ...) must "
                       "match the source's")


def _resized_vocab(path: str, value: np.ndarray, leaf: Any, source_dir: str,
                   source_vocab_size: int | None, target_vocab_size: int | None) -> np.ndarray:
    """The source's rows of a vocabulary-padded parameter over the target's own padding rows."""
    axis = VOCAB_AXES.get(path)
    other_dims_match = (axis is not None and value.ndim == len(leaf.shape)
                        and all(a == b for i, (a, b) in enumerate(zip(value.shape, leaf.shape)) if i != axis))
    if not other_dims_match:
        raise _shape_error(source_dir, path, value.shape, tuple(leaf.shape))
    if source_vocab_size is None or source_vocab_size != target_vocab_size:
        raise ConfigError(f"train.init_from={source_dir}: {path} holds {source_vocab_size} tokens there and "
                          f"{target_vocab_size} in this run (shapes {value.shape} and {tuple(leaf.shape)}); use the "
                          f"source's tokenizer ({source_dir}/tokenizer)")
    merged = np.array(jax.device_get(leaf), copy=True)
    rows = [slice(None)] * value.ndim
    rows[axis] = slice(0, min(value.shape[axis], leaf.shape[axis]))
    merged[tuple(rows)] = value[tuple(rows)].astype(merged.dtype)
    return merged


def merge_params(target: Any, source: Mapping[str, Any], *, target_family: str, source_family: str,
                 source_vocab_size: int | None = None, target_vocab_size: int | None = None,
                 source_dir: str = "DIR") -> tuple[Any, dict[str, list[str]]]:
    """`target` (freshly initialised, any array type) with every parameter it shares with `source` replaced by the
    source's value (as a numpy array in the target's dtype).

    A vocabulary-padded parameter (VOCAB_AXES) whose padding differs keeps the target's extra rows when the real
    vocabulary sizes agree. Returns (merged, report) with the paths "loaded" (incl. "resized" ones), "new" (kept
    as initialised) and "dropped" (in the source only); raises ConfigError for another family, a shape mismatch
    or nothing shared. Scanned and looped trees mix freely: the paths of the report are the looped ones
    (`block_{i}/...`) and `merged` has the layout of `target`.
    """
    if source_family != target_family:
        raise ConfigError(f"train.init_from={source_dir} holds a model of family {source_family!r}; this run's "
                          f"model.family is {target_family!r}: start from a work directory of the same family")
    target_scanned = layer_layout.is_scanned(target)
    source, target = layer_layout.to_looped(source), layer_layout.to_looped(target)
    flat_source = {param_path(key_path): leaf for key_path, leaf in jax.tree_util.tree_leaves_with_path(source)}
    report: dict[str, list[str]] = {"loaded": [], "resized": [], "new": [], "dropped": []}

    def take(key_path: Any, leaf: Any) -> Any:
        path = param_path(key_path)
        if path not in flat_source:
            report["new"].append(path)
            return leaf
        report["loaded"].append(path)
        value = np.asarray(flat_source[path])
        if value.shape == tuple(leaf.shape):
            return value.astype(leaf.dtype)
        report["resized"].append(path)
        return _resized_vocab(path, value, leaf, source_dir, source_vocab_size, target_vocab_size)

    merged = jax.tree_util.tree_map_with_path(take, target)
    target_paths = set(report["loaded"]) | set(report["new"])
    report["dropped"] = sorted(set(flat_source) - target_paths)
    if not report["loaded"]:
        raise ConfigError(f"train.init_from={source_dir} shares no parameter with this model: its top-level "
                          f"parameters are {', '.join(sorted(source))}, this run's {', '.join(sorted(target))}")
    return layer_layout.to_layout(merged, target_scanned), report


def init_params_from(workdir: str, target: Any, model_config: ModelConfig) -> tuple[Any, dict[str, list[str]]]:
    """`merge_params` of DIR's latest parameters into `target`, the freshly initialised params of this run."""
    source, source_config = read_source_params(workdir)
    return merge_params(target, source, target_family=model_config.family,
                        source_family=source_config.get("family", "decoder"),
                        source_vocab_size=source_config.get("vocab_size"),
                        target_vocab_size=model_config.vocab_size, source_dir=workdir)


def check_init_from(workdir: str, family: str) -> None:
    """Before anything is built: train.init_from names a work directory with a checkpoint of this family."""
    root = epath.Path(os.path.abspath(workdir))  # Orbax reads no item metadata through a relative path
    if not root.is_dir():
        raise ConfigError(f"train.init_from={workdir} is not a directory: give a work directory written by "
                          "llm_jax.train or llm_jax.convert")
    source_family = _read_model_config(root, workdir).get("family", "decoder")
    _latest_state_dir(root, workdir)
    if source_family != family:
        raise ConfigError(f"train.init_from={workdir} holds a model of family {source_family!r}; this run's "
                          f"model.family is {family!r}: start from a work directory of the same family")
