"""optimizer.z_loss: off it leaves the loss and gradient bit-identical; on, the train loss is cross-entropy plus
z_loss * mean(logsumexp(logits)^2) over the weighted targets (logged as train/z_loss, exact under gradient
accumulation), and its gradient pulls logsumexp toward 0."""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import random_text_run, window_config
from llm_jax import config as config_lib
from llm_jax.errors import ConfigError
from llm_jax.tasks import TASKS, build_task
from llm_jax.training.run import model_inputs_fn
from llm_jax.training.state import init_state
from llm_jax.training.steps import _gradients, apply_model, make_train_step

SEQ_LEN, BATCH = 16, 8
Z = 1e-2


def _config():
    return window_config(SEQ_LEN, BATCH, steps=4)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return random_text_run(tmp_path_factory, _config())


@pytest.fixture(scope="module")
def params(run):
    with jax.set_mesh(run.mesh), run.rules_context():
        return init_state(run.model, run.tx, model_inputs_fn(run.task), 0, run.shardings).params


@pytest.fixture(scope="module")
def batch(run):
    return {key: value[0] for key, value in run.data.train.next_chunk(1).items()}


def task_with(run, z_loss: float):
    config = copy.deepcopy(run.config)
    config.optimizer.z_loss = z_loss
    return type(run.task)(config)


def gradients(run, task, params, batch, accum=1):
    with jax.set_mesh(run.mesh), run.rules_context():
        return jax.jit(lambda p, b: _gradients(run.model, task, p, b, None, accum))(params, batch)


def test_off_is_bit_identical_to_the_loss_without_it(run, params, batch):
    """The loss and gradient before z-loss existed: the task's terms over their weights, nothing else."""
    def before(p, b):
        terms = run.task.loss_terms(apply_model(run.model, run.task, p, b), b)
        totals = {name: jnp.maximum(weight, 1.0) for name, weight in run.task.loss_weights(b).items()}
        return sum(loss_sum / totals[name] for name, (loss_sum, _) in terms.items())

    with jax.set_mesh(run.mesh), run.rules_context():
        loss_before, grads_before = jax.jit(jax.value_and_grad(before))(params, batch)
    loss, parts, grads = gradients(run, task_with(run, 0.0), params, batch)
    assert parts == {}
    np.testing.assert_array_equal(loss, loss_before)
    jax.tree.map(np.testing.assert_array_equal, grads, grads_before)


def test_on_adds_the_hand_computed_penalty_and_logs_it(run, params, batch):
    with jax.set_mesh(run.mesh), run.rules_context():
        logits_BTV = np.asarray(jax.jit(lambda p, b: apply_model(run.model, run.task, p, b).heads["lm"])(params, batch),
                                np.float64)
    weights_BT, targets_BT = np.asarray(batch["weights"], np.float64), np.asarray(batch["targets"])
    lse_BT = np.log(np.exp(logits_BTV - logits_BTV.max(-1, keepdims=True)).sum(-1)) + logits_BTV.max(-1)
    target_logit_BT = np.take_along_axis(logits_BTV, targets_BT[..., None], -1)[..., 0]
    cross_entropy = np.sum(weights_BT * (lse_BT - target_logit_BT)) / weights_BT.sum()
    penalty = Z * np.sum(weights_BT * lse_BT ** 2) / weights_BT.sum()

    task = task_with(run, Z)
    step = make_train_step(run.model, task, optax.sgd(0.0), optax.constant_schedule(0.0), 1, use_dropout=False)
    with jax.set_mesh(run.mesh), run.rules_context():
        state = init_state(run.model, optax.sgd(0.0), model_inputs_fn(task), 0, None)
        _, metrics = jax.jit(step)(state.replace(params=params), batch)
    assert penalty > 1e-3  # logsumexp is about log(vocabulary) at init: a penalty the test can see
    np.testing.assert_allclose(metrics["train/z_loss"], penalty, rtol=1e-5)
    np.testing.assert_allclose(metrics["train/loss"], cross_entropy + penalty, rtol=1e-5)


def test_on_is_exact_under_gradient_accumulation(run, params, batch):
    task = task_with(run, Z)
    loss_1, parts_1, grads_1 = gradients(run, task, params, batch)
    loss_4, parts_4, grads_4 = gradients(run, task, params, batch, accum=4)
    np.testing.assert_allclose(loss_4, loss_1, rtol=1e-6)
    np.testing.assert_allclose(parts_4["train/z_loss"], parts_1["train/z_loss"], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), grads_4, grads_1)


def test_its_gradient_pulls_logsumexp_toward_zero(run, params, batch):
    """The z-loss part of the gradient (with z_loss minus without) is a descent direction for mean lse^2: a
    small step along it lowers logsumexp, which starts near log(vocabulary) > 0."""
    def mean_lse_squared(p):
        with jax.set_mesh(run.mesh), run.rules_context():
            logits_BTV = apply_model(run.model, run.task, p, batch).heads["lm"]
        lse_BT = jax.nn.logsumexp(logits_BTV, -1)
        return float(jnp.sum(batch["weights"] * lse_BT ** 2) / jnp.sum(batch["weights"]))

    _, _, grads_off = gradients(run, task_with(run, 0.0), params, batch)
    _, _, grads_on = gradients(run, task_with(run, 1.0), params, batch)
    z_direction = jax.tree.map(jnp.subtract, grads_on, grads_off)
    stepped = jax.tree.map(lambda p, g: p - 0.5 * g, params, z_direction)
    before, after = mean_lse_squared(params), mean_lse_squared(stepped)
    assert before > 1.0 and after < 0.95 * before, (before, after)  # measured: 8.65 -> 8.05


def test_negative_coefficient_is_a_config_error():
    config = config_lib.default_config()
    config.optimizer.z_loss = -1e-4
    with pytest.raises(ConfigError, match=r"optimizer.z_loss=-0.0001 must be >= 0"):
        config_lib.validate(config, 1)


def test_tasks_without_a_vocabulary_softmax_refuse_it():
    config = config_lib.default_config()
    config.model.family = "encoder"
    config.data.update(objective="classification", pipeline="grain", labels=("neg", "pos"))
    config.optimizer.z_loss = 1e-4
    with pytest.raises(ConfigError, match="data.objective='classification' has none.*set optimizer.z_loss=0"):
        build_task(config)
    config.data.objective = "masked_lm"
    assert TASKS.get("masked_lm").vocab_terms == ("mlm",)
    build_task(config)
