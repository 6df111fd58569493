"""The train step on one device: gradient accumulation and scanned multi-step dispatch are exact, dropout is
keyed by (state.rng, step), and the learning-rate metric is the schedule's value at the step."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from conftest import random_text_run, window_config
from llm_jax import config as config_lib
from llm_jax.models.families import build_model
from llm_jax.sharding import batch_sharding

from llm_jax.training.run import model_inputs_fn
from llm_jax.training.state import init_state
from llm_jax.training.steps import _split_micro_batches, make_train_chunk, make_train_step

SEQ_LEN, BATCH, CHUNK = 16, 8, 6
LR, MIN_LR, WARMUP = 1e-3, 1e-4, 2


def _config():
    config = window_config(SEQ_LEN, BATCH, CHUNK)
    config.optimizer.update(schedule="cosine", learning_rate=LR, min_learning_rate=MIN_LR, warmup_steps=WARMUP)
    return config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A one-device run; its cosine schedule warms up over 2 steps (rate 0 at step 0) and ends at step CHUNK."""
    return random_text_run(tmp_path_factory, _config())


@pytest.fixture(scope="module")
def state(run):
    with jax.set_mesh(run.mesh), run.rules_context():
        return init_state(run.model, run.tx, model_inputs_fn(run.task), 0, run.shardings)


@pytest.fixture(scope="module")
def batches(run):
    """CHUNK consecutive training batches, [CHUNK, BATCH, SEQ_LEN]."""
    return run.data.train.next_chunk(CHUNK)


def _jit(run, fn, *, stacked=False):
    """Jitted with the run's state shardings: states stay on the device between calls, one compile each."""
    return jax.jit(fn, in_shardings=(run.shardings, batch_sharding(run.mesh, run.rules, stacked=stacked)),
                   out_shardings=(run.shardings, None))


def _call(run, jitted, state, batch):
    """(new state on the device, metrics on the host)."""
    with jax.set_mesh(run.mesh), run.rules_context():
        new_state, metrics = jitted(state, batch)
    return new_state, jax.device_get(metrics)


@pytest.fixture(scope="module")
def step(run):
    """The jitted plain train step (grad_accum_steps=1, no dropout)."""
    return _jit(run, make_train_step(run.model, run.task, run.tx, run.schedule, 1, use_dropout=False))


@pytest.fixture(scope="module")
def step_accum4(run):
    return _jit(run, make_train_step(run.model, run.task, run.tx, run.schedule, 4, use_dropout=False))


def _batch(batches, i):
    return {key: value[i] for key, value in batches.items()}


def _assert_trees_close(actual, expected, rel=1e-5):
    actual, expected = jax.device_get((actual, expected))
    flat_expected = jax.tree_util.tree_leaves_with_path(expected)
    flat_actual = dict(jax.tree_util.tree_leaves_with_path(actual))
    assert len(flat_actual) == len(flat_expected)
    for path, want in flat_expected:
        got = np.asarray(flat_actual[path])
        error = np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)
        assert error < rel, f"{jax.tree_util.keystr(path)}: relative error {error:.2e}"


def _max_change(new, old):
    new, old = jax.device_get((new, old))
    return max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
               for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(old)))


# ----------------------------------------------------------------------------- gradient accumulation


def test_split_micro_batches_takes_rows_with_stride():
    batch = {"inputs": np.arange(8 * 3).reshape(8, 3)}
    micro = np.asarray(_split_micro_batches(batch, 4)["inputs"])
    assert micro.shape == (4, 2, 3)
    np.testing.assert_array_equal(micro[:, :, 0], [[0, 12], [3, 15], [6, 18], [9, 21]])
    # every row lands in exactly one micro-batch
    assert sorted(micro.reshape(8, 3)[:, 0].tolist()) == list(range(0, 24, 3))


@pytest.fixture(scope="module")
def after_first_step(run, state, batches, step):
    """State and metrics after step 0 (learning rate 0 in the warmup: Adam's moments are set, params are not)."""
    return _call(run, step, state, _batch(batches, 0))


@pytest.mark.parametrize("uneven_weights", [False, True], ids=["all_tokens", "masked_tokens"])
def test_grad_accumulation_equals_the_full_batch_step(run, batches, step, step_accum4, after_first_step,
                                                     uneven_weights):
    start, _ = after_first_step  # step 1: a non-zero learning rate and non-zero Adam moments
    batch = _batch(batches, 1)
    if uneven_weights:
        # micro-batch 0 (rows 0 and 4) has no weight at all and row 1 half of it: accumulation must still give
        # the mean over all weighted tokens of the batch, not a mean of micro-batch means
        weights = batch["weights"].copy()
        weights[[0, 4]] = 0.0
        weights[1, ::2] = 0.0
        batch = dict(batch, weights=weights)
    (state_1, metrics_1), (state_4, metrics_4) = _call(run, step, start, batch), _call(run, step_accum4, start, batch)
    assert int(state_1.step) == int(state_4.step) == 2
    np.testing.assert_allclose(metrics_4["train/loss"], metrics_1["train/loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics_4["train/grad_norm"], metrics_1["train/grad_norm"], rtol=1e-5)
    assert metrics_4["train/tokens"] == metrics_1["train/tokens"] == batch["weights"].sum()
    _assert_trees_close(state_4.params, state_1.params)
    _assert_trees_close(state_4.opt_state, state_1.opt_state)
    assert _max_change(state_1.params, start.params) > LR / 4, "the step must move the parameters"
    assert 2.0 < float(metrics_1["train/loss"]) < 4.0  # a token mean, about log(vocab=18) at init


# ----------------------------------------------------------------------------- steps_per_dispatch


@pytest.fixture(scope="module")
def chunk_result(run, state, batches, step):
    train_step = make_train_step(run.model, run.task, run.tx, run.schedule, 1, use_dropout=False)
    return _call(run, _jit(run, make_train_chunk(train_step), stacked=True), state, batches)


def test_scanned_chunk_equals_separate_steps(run, state, batches, step, chunk_result, after_first_step):
    chunk_state, chunk_metrics = chunk_result
    separate, metrics = after_first_step
    losses = [float(metrics["train/loss"])]
    for i in range(1, CHUNK):
        separate, metrics = _call(run, step, separate, _batch(batches, i))
        losses.append(float(metrics["train/loss"]))
    assert int(chunk_state.step) == int(separate.step) == CHUNK
    assert chunk_metrics["train/loss"].shape == (CHUNK,)
    np.testing.assert_allclose(chunk_metrics["train/loss"], losses, rtol=1e-5)
    assert len(set(losses)) == CHUNK, "each step sees another batch and newer parameters"
    _assert_trees_close(chunk_state.params, separate.params)
    _assert_trees_close(chunk_state.opt_state, separate.opt_state)
    assert _max_change(chunk_state.params, state.params) > LR


# ----------------------------------------------------------------------------- dropout


@pytest.fixture(scope="module")
def dropout_step(run):
    model = build_model(run.model_config.replace(dropout=0.3))
    return _jit(run, make_train_step(model, run.task, run.tx, run.schedule, 1, use_dropout=True))


def test_dropout_is_deterministic_per_state_and_step(run, state, batches, dropout_step):
    batch = _batch(batches, 0)
    first_state, first = _call(run, dropout_step, state, batch)
    second_state, second = _call(run, dropout_step, state, batch)
    other_step_state = jax.device_put(state.replace(step=state.step + 1), run.shardings)
    _, other_step = _call(run, dropout_step, other_step_state, batch)
    other_rng_state = jax.device_put(state.replace(rng=jax.random.key_data(jax.random.key(123))), run.shardings)
    _, other_rng = _call(run, dropout_step, other_rng_state, batch)
    assert first["train/loss"] == second["train/loss"]
    for a, b in zip(*jax.device_get((jax.tree.leaves(first_state), jax.tree.leaves(second_state)))):
        np.testing.assert_array_equal(a, b)
    assert other_step["train/loss"] != first["train/loss"], "the dropout key must depend on the step"
    assert other_rng["train/loss"] != first["train/loss"], "the dropout key must depend on state.rng"


def test_dropout_changes_the_train_loss(run, state, batches, step, dropout_step):
    batch = _batch(batches, 0)
    _, without = _call(run, step, state, batch)
    _, with_dropout = _call(run, dropout_step, state, batch)
    assert abs(float(with_dropout["train/loss"]) - float(without["train/loss"])) > 1e-3


# ----------------------------------------------------------------------------- learning-rate metric


def test_learning_rate_metric_is_the_schedule_at_each_step(run, state, chunk_result, after_first_step):
    _, metrics = chunk_result
    rates = metrics["train/learning_rate"]
    np.testing.assert_allclose(rates, [float(run.schedule(s)) for s in range(CHUNK)], rtol=1e-6, atol=1e-12)
    # the closed form: warmup 0, lr / 2, then cosine from lr at step 2 to min_learning_rate at step CHUNK
    np.testing.assert_allclose(rates[:3], [0.0, LR / 2, LR], rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(rates[4], MIN_LR + (LR - MIN_LR) / 2, rtol=1e-5)
    # the metric is the rate the update used: step 0 (rate 0) leaves every parameter as it was
    after_first, first_metrics = after_first_step
    assert float(first_metrics["train/learning_rate"]) == 0.0
    assert _max_change(after_first.params, state.params) == 0.0


# ----------------------------------------------------------------------------- non-finite updates


def test_skip_nonfinite_keeps_the_previous_state_for_a_nan_step_and_applies_the_next(run, state, batches):
    """A NaN loss at step 1 (NaN token weights) is skipped on device; the chunk then ends where steps 0 and 2
    alone would have taken it. Without the guard the NaN reaches the parameters."""
    poisoned = {key: np.array(value) for key, value in batches.items()}
    poisoned["weights"][1] = np.nan
    three = {key: value[:3] for key, value in poisoned.items()}
    skip = make_train_step(run.model, run.task, run.tx, run.schedule, 1, use_dropout=False, skip_nonfinite=True)
    plain = make_train_step(run.model, run.task, run.tx, run.schedule, 1, use_dropout=False)
    skipped_state, metrics = _call(run, _jit(run, make_train_chunk(skip), stacked=True), state, three)
    np.testing.assert_array_equal(metrics["train/skipped"], [0.0, 1.0, 0.0])
    assert int(skipped_state.step) == 3, "the skipped step still consumed its batch"
    expected = state
    for i in (0, 2):
        expected, _ = _call(run, _jit(run, plain), expected, _batch(poisoned, i))
    _assert_trees_close(skipped_state.params, expected.params, rel=1e-6)
    _assert_trees_close(skipped_state.opt_state, expected.opt_state, rel=1e-6)
    unguarded, _ = _call(run, _jit(run, make_train_chunk(plain), stacked=True), state, three)
    assert not all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(jax.device_get(unguarded.params)))


def _guard(policy: str, max_skips: int = 2, spike_factor: float = 3.0):
    from llm_jax.training.loop import NonfiniteGuard

    train = config_lib.default_config().train
    train.update(nonfinite=policy, max_consecutive_skips=max_skips, loss_spike_factor=spike_factor)
    return NonfiniteGuard(train)


def _chunk(losses, norms=None, skipped=None):
    metrics = {"train/loss": np.array(losses, np.float32),
               "train/grad_norm": np.array(norms if norms is not None else [1.0] * len(losses), np.float32)}
    if skipped is not None:
        metrics["train/skipped"] = np.array(skipped, np.float32)
    return metrics


def test_nonfinite_stop_names_the_first_bad_step_of_loss_or_gradient():
    from llm_jax.errors import TrainingDivergedError

    guard = _guard("stop")
    guard.check(0, _chunk([2.0, 1.9]))
    with pytest.raises(TrainingDivergedError, match="train/grad_norm inf at step 4"):
        guard.check(2, _chunk([1.8, 1.7, np.nan], norms=[1.0, np.inf, 1.0]))


def test_nonfinite_skip_counts_runs_of_skips_and_stops_after_too_many(caplog):
    from llm_jax.errors import TrainingDivergedError

    guard = _guard("skip", max_skips=2)
    guard.check(0, _chunk([2.0, np.nan, np.nan, 1.9], skipped=[0, 1, 1, 0]))  # two in a row: allowed
    with pytest.raises(TrainingDivergedError, match="3 updates in a row were skipped .* up to step 7"):
        guard.check(4, _chunk([np.nan, np.nan, np.nan], skipped=[1, 1, 1]))


def test_a_loss_spike_is_logged_with_its_step(caplog):
    guard = _guard("stop", spike_factor=3.0)
    with caplog.at_level("WARNING"):
        guard.check(0, _chunk([2.0, 2.1, 1.9, 9.0, 2.0]))
    assert [record.getMessage() for record in caplog.records if "spike" in record.getMessage()] == \
        ["loss spike at step 4: train/loss 9.0000 is 4.5x the running average 1.9990"]
