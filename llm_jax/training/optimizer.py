"""Learning-rate schedules (selected by `optimizer.schedule`) and the Optax clip + AdamW chain."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from llm_jax.registry import Registry

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

    def decay(count: jnp.ndarray) -> jnp.ndarray:
        return opt.learning_rate * jnp.sqrt(warmup / jnp.maximum(count + opt.warmup_steps, warmup))

    return _after_warmup(opt, decay)


NO_DECAY_NAMES = ("bias", "scale")  # biases of every shape (q/k/v biases are (heads, head_dim)) and norm scales


def decay_mask(params: optax.Params) -> optax.Params:
    """Weight decay on weight matrices and embeddings only: not on biases, norm scales or other 1-D params."""
    def decays(path, p) -> bool:
        name = getattr(path[-1], "key", None)
        return p.ndim >= 2 and name not in NO_DECAY_NAMES

    return jax.tree_util.tree_map_with_path(decays, params)


def build_optimizer(opt: ml_collections.ConfigDict, total_steps: int) -> tuple[optax.GradientTransformation,
                                                                               optax.Schedule]:
    """clip_by_global_norm (when grad_clip_norm > 0) then AdamW with the configured schedule."""
    schedule = SCHEDULES.get(opt.schedule)(opt, total_steps)
    adamw = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
                        mask=decay_mask)
    if opt.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), adamw), schedule
    return adamw, schedule
