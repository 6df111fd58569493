"""Pure train and eval steps: (state, batch) -> (state, metrics), jitted by the host loop.

The task (`llm_jax.tasks`) says how a batch becomes model inputs and what the loss and metrics are; the
steps, gradient accumulation and dropout keys here are the same for every task.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from llm_jax.models.outputs import Outputs
from llm_jax.tasks.base import Batch, Task
from llm_jax.training.state import TrainState
from llm_jax.training.optimizer import trainable_grad_norm

Metrics = dict[str, jax.Array]


def apply_model(model: nn.Module, task: Task, params: Any, batch: Batch, dropout_key: jax.Array | None = None
                ) -> Outputs:
    """The model's named outputs on a batch; dropout is on when a key is given."""
    deterministic = dropout_key is None
    rngs = {} if deterministic else {"dropout": dropout_key}
    return model.apply({"params": params}, **task.model_inputs(batch), deterministic=deterministic, rngs=rngs)


def _split_micro_batches(batch: Batch, num_micro: int) -> Batch:
    """[B, ...] -> [num_micro, B / num_micro, ...], taking rows with stride so each shard splits locally."""
    def split(x: jax.Array) -> jax.Array:
        x = x.reshape((x.shape[0] // num_micro, num_micro) + x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    return jax.tree.map(split, batch)


def _gradients(model: nn.Module, task: Task, params: Any, batch: Batch, dropout_key: jax.Array | None,
               grad_accum_steps: int) -> tuple[jax.Array, Metrics, Any]:
    """The task's loss (each term's sum over the weight of the whole batch, plus its z-loss terms), the parts
    logged beside it (train/z_loss) and the gradient, accumulated over micro-batches: exactly the full-batch
    values."""
    totals = {name: jnp.maximum(weight, 1.0) for name, weight in task.loss_weights(batch).items()}

    def loss_fn(p: Any, micro: Batch, key: jax.Array | None) -> tuple[jax.Array, Metrics]:
        outputs = apply_model(model, task, p, micro, key)
        terms = task.loss_terms(outputs, micro)
        loss = sum(loss_sum / totals[name] for name, (loss_sum, _) in terms.items())
        z_terms = task.z_loss_terms(outputs, micro)  # empty with optimizer.z_loss=0: the program is unchanged
        if not z_terms:
            return loss, {}
        z_loss = sum(z_sum / totals[name] for name, (z_sum, _) in z_terms.items())
        return loss + z_loss, {"train/z_loss": z_loss}

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if grad_accum_steps == 1:
        (loss, parts), grads = grad_fn(params, batch, dropout_key)
        return loss, parts, grads

    def accumulate(carry, micro_and_index):
        micro, index = micro_and_index
        key = None if dropout_key is None else jax.random.fold_in(dropout_key, index)
        (loss, parts), grads = grad_fn(params, micro, key)
        return jax.tree.map(jnp.add, carry, (loss, parts, grads)), None

    micro_batches = _split_micro_batches(batch, grad_accum_steps)
    _, parts = jax.eval_shape(loss_fn, params, jax.tree.map(lambda x: x[0], micro_batches), dropout_key)
    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), parts),
             jax.tree.map(jnp.zeros_like, params))
    (loss, parts, grads), _ = jax.lax.scan(accumulate, zeros, (micro_batches, jnp.arange(grad_accum_steps)))
    return loss, parts, grads


def all_finite(tree: Any) -> jax.Array:
    """Whether every element of every array in `tree` is finite (one boolean on device)."""
    leaves = [jnp.isfinite(leaf).all() for leaf in jax.tree.leaves(tree)]
    return jnp.stack(leaves).all() if leaves else jnp.array(True)


def _keep_if_bad(new: TrainState, old: TrainState, ok: jax.Array) -> TrainState:
    """The update when `ok`, else the previous parameters and optimizer state (the step still advances: the
    batch was consumed)."""
    keep = lambda updated, previous: jnp.where(ok, updated, previous)  # noqa: E731
    return new.replace(params=jax.tree.map(keep, new.params, old.params),
                       opt_state=jax.tree.map(keep, new.opt_state, old.opt_state))


def make_train_step(model: nn.Module, task: Task, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    grad_accum_steps: int, use_dropout: bool, frozen: Any = None, skip_nonfinite: bool = False
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """One optimizer update; the dropout key is derived from (state.rng, step), so resumes are exact. With a
    `frozen` mask (True = frozen), train/grad_norm covers the trainable parameters only. With `skip_nonfinite`
    (train.nonfinite=skip) an update whose loss, gradient or new parameters are not finite is not applied and
    train/skipped is 1 for that step."""

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        dropout_key = None
        if use_dropout:
            dropout_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        loss, loss_parts, grads = _gradients(model, task, state.params, batch, dropout_key, grad_accum_steps)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = trainable_grad_norm(grads, frozen)  # frozen rows of scanned stacks are masks, not bools
        metrics = {"train/loss": loss, "train/grad_norm": grad_norm,
                   "train/learning_rate": schedule(state.step), "train/tokens": task.tokens(batch), **loss_parts}
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        if skip_nonfinite:
            ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite(params)
            new_state = _keep_if_bad(new_state, state, ok)
            metrics["train/skipped"] = 1.0 - ok.astype(jnp.float32)
        return new_state, metrics

    return train_step


def make_train_chunk(train_step: Callable[[TrainState, Batch], tuple[TrainState, Metrics]]):
    """Several optimizer steps in one device call: a lax.scan over a [steps, batch, ...] stack."""

    def train_chunk(state: TrainState, batches: Batch) -> tuple[TrainState, Metrics]:
        return jax.lax.scan(train_step, state, batches)

    return train_chunk


def make_eval_step(model: nn.Module, task: Task) -> Callable[[Any, Batch], Metrics]:
    """The task's metric sums of one batch (summed again over batches on the host)."""

    def eval_step(params: Any, batch: Batch) -> Metrics:
        return task.eval_sums(apply_model(model, task, params, batch), batch)

    return eval_step
