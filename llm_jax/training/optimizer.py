"""Learning-rate schedules (selected by `optimizer.schedule`), the Optax clip + AdamW chain, frozen
parameters (`train.freeze`) and layer-wise learning-rate decay (`optimizer.layer_decay`).

Both layer layouts are served (`model.scan_layers`): looped blocks are whole leaves (`block_{i}/...`), while a
scanned stack holds every layer in one leaf (`blocks/...`, layer i at row i), so its layer decay is a vector
of factors along the stacked axis and `layers:K` freezes rows of those leaves.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from llm_jax.errors import ConfigError
from llm_jax.models import layer_layout
from llm_jax.registry import Registry

# Top-level parameter collections of the task heads and of the input embeddings (model code imports these).
HEAD_PARAMS = ("output_head", "mlm_head", "nsp_head", "classifier", "token_classifier", "crf")
EMBEDDING_PARAMS = ("token_embedding", "position_embedding", "token_type_embedding", "embedding_norm")

ScheduleBuilder = Callable[[ml_collections.ConfigDict, int], optax.Schedule]
SCHEDULES: Registry[ScheduleBuilder] = Registry("learning-rate schedule")


def _decay_steps(opt: ml_collections.ConfigDict, total_steps: int) -> int:
    return max(opt.decay_steps or total_steps, opt.warmup_steps + 1)


def _warmup(opt: ml_collections.ConfigDict) -> optax.Schedule:
    return optax.linear_schedule(0.0, opt.learning_rate, max(opt.warmup_steps, 1))


def _after_warmup(opt: ml_collections.ConfigDict, decay: optax.Schedule) -> optax.Schedule:
    if opt.warmup_steps == 0:
        return decay
    return optax.join_schedules([_warmup(opt), decay], [opt.warmup_steps])


@SCHEDULES.register("cosine")
def cosine(opt: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0, then cosine from learning_rate to min_learning_rate at decay_steps."""
    span = _decay_steps(opt, total_steps) - opt.warmup_steps
    alpha = opt.min_learning_rate / opt.learning_rate
    return _after_warmup(opt, optax.cosine_decay_schedule(opt.learning_rate, span, alpha))


@SCHEDULES.register("linear")
def linear(opt: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0, then linear decay to min_learning_rate at decay_steps."""
    span = _decay_steps(opt, total_steps) - opt.warmup_steps
    return _after_warmup(opt, optax.linear_schedule(opt.learning_rate, opt.min_learning_rate, span))


@SCHEDULES.register("constant")
def constant(opt: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0, then learning_rate for good."""
    return _after_warmup(opt, optax.constant_schedule(opt.learning_rate))


@SCHEDULES.register("rsqrt")
def rsqrt(opt: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0, then learning_rate * sqrt(warmup / step) (the original Transformer's decay)."""
    warmup = max(opt.warmup_steps, 1)

    def decay(count: jax.Array) -> jax.Array:
        return opt.learning_rate * jnp.sqrt(warmup / jnp.maximum(count + opt.warmup_steps, warmup))

    return _after_warmup(opt, decay)


NO_DECAY_NAMES = ("bias", "scale")  # biases of every shape (q/k/v biases are (heads, head_dim)) and norm scales


def decay_mask(params: optax.Params) -> optax.Params:
    """Weight decay on weight matrices and embeddings only: not on biases, norm scales or other 1-D params."""
    def decays(path, p) -> bool:
        name = getattr(path[-1], "key", None)
        return p.ndim >= 2 and name not in NO_DECAY_NAMES

    return jax.tree_util.tree_map_with_path(decays, params)


def param_path(key_path: Sequence[Any]) -> str:
    """'block_0/mlp/up/kernel' for a jax key path (dict keys, attributes or sequence indices)."""
    def name(entry: Any) -> str:
        for attribute in ("key", "name", "idx"):
            if hasattr(entry, attribute):
                return str(getattr(entry, attribute))
        return str(entry)

    return "/".join(name(entry) for entry in key_path)


def _block_index(top: str) -> int | None:
    match = layer_layout.LOOPED_PATTERN.fullmatch(top)
    return int(match.group(1)) if match else None


def _is_stacked(path: str) -> bool:
    """Whether a "/"-joined path is inside a scanned stack (leading axis = layers)."""
    return path.split("/")[0] == layer_layout.SCANNED


def _count_blocks(params: optax.Params) -> int:
    if layer_layout.SCANNED in params:
        return int(jax.tree.leaves(params[layer_layout.SCANNED])[0].shape[0])
    indices = [_block_index(top) for top in params]
    return max([i for i in indices if i is not None], default=-1) + 1


def _per_layer(value: Any, leaf: Any) -> Any:
    """A per-layer vector [L] shaped to broadcast against a stacked leaf [L, ...]; scalars unchanged."""
    value = np.asarray(value)
    return value if value.ndim == 0 else value.reshape((-1,) + (1,) * (len(leaf.shape) - 1))


def _scanned_hint(params: optax.Params, pattern: str) -> str:
    """What to write instead of a regex that names single blocks of a scanned model."""
    if not layer_layout.is_scanned(params) or "block_" not in pattern:
        return ""
    return (f"; with model.scan_layers=True the blocks are stacked under '{layer_layout.SCANNED}/' (layer i is "
            "row i of each array), so a regex selects all layers at once (e.g. 'blocks/mlp/.*'): freeze the first "
            "K blocks with 'layers:K', or set model.scan_layers=False to address single blocks")


def _freeze_matcher(item: str, num_layers: int) -> Callable[[str], bool | np.ndarray]:
    """Whether a "/"-joined parameter path is frozen by one `train.freeze` item: a bool, or for `layers:K` on a
    scanned stack a [num_layers] bool vector (the first K rows)."""
    if item == "embeddings":
        return lambda path: path.split("/")[0] in EMBEDDING_PARAMS
    if item == "all_but_heads":
        return lambda path: path.split("/")[0] not in HEAD_PARAMS
    if item.startswith("layers:"):
        try:
            count = int(item[len("layers:"):])
        except ValueError:
            raise ConfigError(f"train.freeze item {item!r}: 'layers:K' needs an integer K (the first K blocks), "
                              "e.g. 'layers:2'") from None
        if num_layers > 0 and count > num_layers:
            raise ConfigError(f"train.freeze item {item!r} asks for the first {count} blocks; the model has "
                              f"{num_layers} (model.num_layers)")

        def in_first_blocks(path: str) -> bool | np.ndarray:
            if _is_stacked(path):
                return np.arange(num_layers) < count
            block = _block_index(path.split("/")[0])
            return block is not None and block < count

        return in_first_blocks
    try:
        pattern = re.compile(item)
    except re.error as error:
        raise ConfigError(f"train.freeze item {item!r} is neither 'embeddings', 'layers:K', 'all_but_heads' nor "
                          f"a valid regex ({error})") from None
    return lambda path: pattern.fullmatch(path) is not None


def _leaf_frozen(path: str, leaf: Any, matchers: list[Callable[[str], Any]]) -> bool | np.ndarray:
    """True/False, or for a stacked leaf frozen in some layers only, a bool array [L, 1, ...] (True = frozen)."""
    frozen = np.asarray(functools.reduce(np.logical_or, [matcher(path) for matcher in matchers], False))
    if frozen.ndim == 0 or frozen.all() or not frozen.any():
        return bool(frozen.all())
    return _per_layer(frozen, leaf)


def frozen_mask(params: optax.Params, freeze: Sequence[str], num_layers: int) -> optax.Params:
    """A tree shaped like `params` (True = frozen) from the `train.freeze` items; `params` may be abstract
    (ShapeDtypeStructs). Leaves are bools, except stacked leaves of a scanned model that `layers:K` freezes in
    part: bool arrays [L, 1, ...] that broadcast against them. Every item must match some parameter, so a typo
    cannot go unnoticed."""
    if isinstance(freeze, str):
        freeze = (freeze,)
    num_layers = num_layers or _count_blocks(params)
    paths = [param_path(key_path) for key_path, _ in jax.tree_util.tree_leaves_with_path(params)]
    matchers = []
    for item in freeze:
        matcher = _freeze_matcher(item, num_layers)
        if not any(np.any(matcher(path)) for path in paths):
            raise ConfigError(f"train.freeze item {item!r} matches no parameter; top-level parameters are "
                              f"{', '.join(sorted(params))} (regexes match whole paths like 'block_0/mlp/up/kernel')"
                              f"{_scanned_hint(params, item)}")
        matchers.append(matcher)
    return jax.tree_util.tree_map_with_path(
        lambda key_path, leaf: _leaf_frozen(param_path(key_path), leaf, matchers), params)


def _layer_scale(path: str, num_layers: int, decay: float) -> float | np.ndarray:
    top = path.split("/")[0]
    if _is_stacked(path):  # row i of a scanned stack is block i
        return (decay ** (num_layers - np.arange(num_layers))).astype(np.float32)
    block = _block_index(top)
    if block is not None:
        return decay ** (num_layers - block)
    if top in EMBEDDING_PARAMS:
        return decay ** (num_layers + 1)
    return 1.0  # final_norm, pooler, heads


def layer_scales(params: optax.Params, num_layers: int, decay: float) -> optax.Params:
    """Learning-rate multiplier of every parameter: block i gets decay^(L-i), embeddings decay^(L+1), the final
    norm, pooler and heads 1 (ELECTRA / BEiT layer-wise decay: lower layers move less when fine-tuning). A
    scanned stack's leaves get the vector [decay^L, ..., decay^1] over their layers."""
    return jax.tree_util.tree_map_with_path(
        lambda key_path, _: _layer_scale(param_path(key_path), num_layers, decay), params)


def _path_scale(path: str, num_layers: int, decay: float,
                multipliers: Sequence[tuple[str, float]]) -> float | np.ndarray:
    scale = _layer_scale(path, num_layers, decay)
    for pattern, factor in multipliers:
        if re.fullmatch(pattern, path):
            scale *= factor
    return scale


def check_lr_multipliers(params: optax.Params, multipliers: Sequence[tuple[str, float]]) -> None:
    """Each optimizer.lr_multipliers entry is a (regex, factor > 0) pair whose regex matches some parameter."""
    paths = [param_path(key_path) for key_path, _ in jax.tree_util.tree_leaves_with_path(params)]
    for entry in multipliers:
        if len(entry) != 2 or not isinstance(entry[1], (int, float)) or entry[1] <= 0:
            raise ConfigError(f"optimizer.lr_multipliers entry {entry!r} must be a (path regex, factor > 0) pair, "
                              "e.g. ('crf/.*', 100.0)")
        try:
            matched = any(re.fullmatch(entry[0], path) for path in paths)
        except re.error as error:
            raise ConfigError(f"optimizer.lr_multipliers regex {entry[0]!r} is invalid ({error})") from None
        if not matched:
            raise ConfigError(f"optimizer.lr_multipliers regex {entry[0]!r} matches no parameter; top-level "
                              f"parameters are {', '.join(sorted(params))}{_scanned_hint(params, entry[0])}")


def scale_by_layer(num_layers: int, decay: float,
                   multipliers: Sequence[tuple[str, float]] = ()) -> optax.GradientTransformation:
    """Multiplies each update by its layer scale (see `layer_scales`) and by the factors of the
    optimizer.lr_multipliers regexes its path matches; stateless, and it reads the scale from the parameter
    path, so it also works inside `optax.multi_transform` (whose masked leaves it skips)."""
    def update(updates: optax.Updates, state: optax.EmptyState, params: optax.Params | None = None):
        def scale(key_path: Any, u: jax.Array) -> jax.Array:
            factor = _path_scale(param_path(key_path), num_layers, decay, multipliers)
            return u * jnp.asarray(_per_layer(factor, u), u.dtype)

        return jax.tree_util.tree_map_with_path(scale, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def zero_frozen_layers(keep: dict[str, np.ndarray]) -> optax.GradientTransformation:
    """Multiplies the leaves at the paths of `keep` by their 0/1 per-layer factors [L, 1, ...]: the frozen rows
    of scanned stacks (train.freeze=layers:K). Placed before clipping (the norm sees trainable gradients only)
    and after AdamW (frozen rows get exact zero updates, weight decay included); stateless and path-based like
    scale_by_layer, so it works inside optax.multi_transform."""
    def update(updates: optax.Updates, state: optax.EmptyState, params: optax.Params | None = None):
        def mask(key_path: Any, u: jax.Array) -> jax.Array:
            factor = keep.get(param_path(key_path))
            return u if factor is None else u * jnp.asarray(factor, u.dtype)

        return jax.tree_util.tree_map_with_path(mask, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def trainable_grad_norm(grads: optax.Updates, frozen: optax.Params | None) -> jax.Array:
    """Global norm of the gradients of trainable parameters (train/grad_norm): what clipping sees. `frozen` is
    `frozen_mask`'s tree (None = nothing frozen); a mask passed into jit as an argument works too."""
    if frozen is None:
        return optax.tree.norm(grads)

    def kept(g: jax.Array, is_frozen: Any) -> jax.Array | None:
        if isinstance(is_frozen, (bool, np.bool_)):  # static mask: frozen leaves drop out of the sum
            return None if is_frozen else g
        return jnp.where(is_frozen, jnp.zeros_like(g), g)

    return optax.tree.norm(jax.tree.map(kept, grads, frozen))


def check_optimizer_config(opt: ml_collections.ConfigDict) -> None:
    """Raises ConfigError for optimizer keys out of range."""
    if not 0.0 < opt.layer_decay <= 1.0:
        raise ConfigError(f"optimizer.layer_decay={opt.layer_decay} must be in (0, 1] (1 = off; fine-tuning "
                          "usually uses 0.65-0.95)")


def _adamw_chain(opt: ml_collections.ConfigDict, schedule: optax.Schedule, num_layers: int,
                 keep_layers: dict[str, np.ndarray] | None = None) -> optax.GradientTransformation:
    adamw = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
                        mask=decay_mask)
    parts = [zero_frozen_layers(keep_layers)] if keep_layers else []
    if opt.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(opt.grad_clip_norm))
    parts.append(adamw)
    multipliers = tuple((str(entry[0]), float(entry[1])) for entry in opt.lr_multipliers)
    if opt.layer_decay != 1.0 or multipliers:
        parts.append(scale_by_layer(num_layers, opt.layer_decay, multipliers))
    if keep_layers:
        parts.append(zero_frozen_layers(keep_layers))
    return parts[0] if len(parts) == 1 else optax.chain(*parts)


def _freeze_labels(params: optax.Params, freeze: Sequence[str],
                   num_layers: int) -> tuple[optax.Params, dict[str, np.ndarray]]:
    """(multi_transform labels, 0/1 keep factors of the stacked leaves frozen in some layers only)."""
    mask = frozen_mask(params, freeze, num_layers)
    partial = {param_path(key_path): (~frozen).astype(np.float32)
               for key_path, frozen in jax.tree_util.tree_leaves_with_path(mask) if isinstance(frozen, np.ndarray)}
    labels = jax.tree.map(lambda frozen: "frozen" if frozen is True else "trainable", mask)
    return labels, partial


def build_optimizer(opt: ml_collections.ConfigDict, total_steps: int, params: optax.Params | None = None,
                    freeze: Sequence[str] = (), num_layers: int = 0) -> tuple[optax.GradientTransformation,
                                                                              optax.Schedule]:
    """clip_by_global_norm (when grad_clip_norm > 0), AdamW with the configured schedule, then the layer-wise
    decay scale (when optimizer.layer_decay < 1), so block i's effective learning rate is lr * scale.

    `params` (arrays or ShapeDtypeStructs; never materialised) is needed for `freeze` (train.freeze items, see
    `frozen_mask`) and, when num_layers is 0, to count the blocks for layer decay. Frozen parameters go through
    `optax.multi_transform` to `optax.set_to_zero`: their updates are exact zeros (bit-identical parameters),
    and the clip + AdamW chain sees only trainable leaves (the others are `optax.MaskedNode`s), so the clipping
    norm is that of the trainable gradients and Adam's moments are allocated for trainable parameters only
    (set_to_zero keeps no state): frozen parameters cost no optimizer-state memory. Their gradients are
    still computed by the backward pass. Mapping shardings over this state with `optax.tree_map_params` needs
    `is_leaf=lambda v: isinstance(v, optax.MaskedNode)` and a function that returns MaskedNodes unchanged.
    """
    check_optimizer_config(opt)
    if num_layers <= 0 and params is not None:
        num_layers = _count_blocks(params)
    if opt.layer_decay != 1.0 and num_layers <= 0:
        raise ValueError("build_optimizer needs num_layers (or params) when optimizer.layer_decay != 1")
    if opt.lr_multipliers and params is not None:
        check_lr_multipliers(params, opt.lr_multipliers)
    schedule = SCHEDULES.get(opt.schedule)(opt, total_steps)
    if not freeze:
        return _adamw_chain(opt, schedule, num_layers), schedule
    if params is None:
        raise ValueError("build_optimizer needs params (an abstract tree is enough) when train.freeze is set")
    labels, keep_layers = _freeze_labels(params, freeze, num_layers)
    tx = _adamw_chain(opt, schedule, num_layers, keep_layers)
    return optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()}, labels), schedule
