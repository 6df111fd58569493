"""Pure train and eval steps: (state, batch) -> (state, metrics), jitted by the host loop."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from llm_jax.training.state import TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


def token_losses(model: nn.Module, params: Any, batch: Batch, dropout_key: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array]:
    """(logits_BTV, per-token cross-entropy_BT); dropout is on when a key is given."""
    deterministic = dropout_key is None
    rngs = {} if deterministic else {"dropout": dropout_key}
    logits_BTV = model.apply({"params": params}, batch["inputs"], batch.get("positions"),
                             batch.get("segment_ids"), deterministic=deterministic, rngs=rngs)
    return logits_BTV, optax.softmax_cross_entropy_with_integer_labels(logits_BTV, batch["targets"])


def _split_micro_batches(batch: Batch, num_micro: int) -> Batch:
    """[B, ...] -> [num_micro, B / num_micro, ...], taking rows with stride so each shard splits locally."""
    def split(x: jax.Array) -> jax.Array:
        x = x.reshape((x.shape[0] // num_micro, num_micro) + x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    return jax.tree.map(split, batch)


def _gradients(model: nn.Module, params: Any, batch: Batch, dropout_key: jax.Array | None,
               grad_accum_steps: int) -> tuple[jax.Array, Any]:
    """Mean token loss and its gradient, accumulated over micro-batches (exactly the full-batch mean)."""
    total_weight = jnp.maximum(jnp.sum(batch["weights"]), 1.0)

    def loss_fn(p: Any, micro: Batch, key: jax.Array | None) -> jax.Array:
        return jnp.sum(token_losses(model, p, micro, key)[1] * micro["weights"]) / total_weight

    grad_fn = jax.value_and_grad(loss_fn)
    if grad_accum_steps == 1:
        return grad_fn(params, batch, dropout_key)

    def accumulate(carry, micro_and_index):
        loss_sum, grad_sum = carry
        micro, index = micro_and_index
        key = None if dropout_key is None else jax.random.fold_in(dropout_key, index)
        loss, grads = grad_fn(params, micro, key)
        return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    micro_batches = _split_micro_batches(batch, grad_accum_steps)
    (loss, grads), _ = jax.lax.scan(accumulate, (jnp.zeros((), jnp.float32), zeros),
                                    (micro_batches, jnp.arange(grad_accum_steps)))
    return loss, grads


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    grad_accum_steps: int, use_dropout: bool) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """One optimizer update; the dropout key is derived from (state.rng, step), so resumes are exact."""

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        dropout_key = None
        if use_dropout:
            dropout_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        loss, grads = _gradients(model, state.params, batch, dropout_key, grad_accum_steps)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"train/loss": loss, "train/grad_norm": optax.tree.norm(grads),
                   "train/learning_rate": schedule(state.step), "train/tokens": jnp.sum(batch["weights"])}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def make_train_chunk(train_step: Callable[[TrainState, Batch], tuple[TrainState, Metrics]]):
    """Several optimizer steps in one device call: a lax.scan over a [steps, batch, seq] stack."""

    def train_chunk(state: TrainState, batches: Batch) -> tuple[TrainState, Metrics]:
        return jax.lax.scan(train_step, state, batches)

    return train_chunk


def make_eval_step(model: nn.Module) -> Callable[[Any, Batch], Metrics]:
    """Summed loss, weight and correct-token count of one batch (summed again over batches on the host)."""

    def eval_step(params: Any, batch: Batch) -> Metrics:
        logits_BTV, losses_BT = token_losses(model, params, batch)
        correct_BT = (jnp.argmax(logits_BTV, -1) == batch["targets"]).astype(jnp.float32)
        weights_BT = batch["weights"]
        return {"loss_sum": jnp.sum(losses_BT * weights_BT), "weight_sum": jnp.sum(weights_BT),
                "correct_sum": jnp.sum(correct_BT * weights_BT)}

    return eval_step
