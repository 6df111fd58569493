"""Learning-rate schedules against their closed forms, weight decay on matrices only, global-norm clipping."""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import run_updates
from configs.model_sizes import apply_model_size
from llm_jax import config as config_lib
from llm_jax.models.families import build_model
from llm_jax.models.model_config import build_model_config
from llm_jax.training.optimizer import SCHEDULES, build_optimizer, decay_mask

LR, MIN_LR, WARMUP, TOTAL = 1e-3, 1e-4, 10, 100
ONE_DEVICE = {"data": 1, "fsdp": 1, "tensor": 1}


def _opt(**changes):
    opt = config_lib.default_config().optimizer
    opt.update(learning_rate=LR, min_learning_rate=MIN_LR, warmup_steps=WARMUP)
    opt.update(**changes)
    return opt


def _schedule(name, **changes):
    return SCHEDULES.get(name)(_opt(schedule=name, **changes), TOTAL)


def _check(schedule, expected: dict[int, float]):
    for step, value in expected.items():
        np.testing.assert_allclose(float(schedule(step)), value, rtol=1e-5, atol=1e-12,
                                   err_msg=f"learning rate at step {step}")


def _warmup_values():
    """Linear warmup from 0 to LR over WARMUP steps."""
    return {0: 0.0, 1: LR / WARMUP, WARMUP // 2: LR / 2, WARMUP - 1: LR * (WARMUP - 1) / WARMUP}


def test_registry_holds_the_four_schedules():
    assert set(SCHEDULES.names()) == {"cosine", "linear", "constant", "rsqrt"}


def test_cosine_schedule():
    def cosine(step):
        progress = (step - WARMUP) / (TOTAL - WARMUP)
        return MIN_LR + (LR - MIN_LR) * 0.5 * (1 + math.cos(math.pi * progress))

    _check(_schedule("cosine"), {**_warmup_values(), WARMUP: LR, 30: cosine(30), 55: (LR + MIN_LR) / 2,
                                  90: cosine(90), TOTAL: MIN_LR, TOTAL + 1: MIN_LR, 5 * TOTAL: MIN_LR})


def test_cosine_schedule_with_explicit_decay_steps_and_no_warmup():
    _check(_schedule("cosine", warmup_steps=0, decay_steps=50),
           {0: LR, 25: (LR + MIN_LR) / 2, 50: MIN_LR, 80: MIN_LR})


def test_linear_schedule():
    def linear(step):
        return LR + (MIN_LR - LR) * (step - WARMUP) / (TOTAL - WARMUP)

    _check(_schedule("linear"), {**_warmup_values(), WARMUP: LR, 20: linear(20), 55: (LR + MIN_LR) / 2,
                                  99: linear(99), TOTAL: MIN_LR, 2 * TOTAL: MIN_LR})


def test_constant_schedule():
    _check(_schedule("constant"), {**_warmup_values(), WARMUP: LR, 50: LR, 10 * TOTAL: LR})
    _check(_schedule("constant", warmup_steps=0), {0: LR, 1: LR, 1000: LR})


def test_rsqrt_schedule():
    expected = {step: LR * math.sqrt(WARMUP / step) for step in (WARMUP, 11, 40, 90, 1000, 10**6)}
    _check(_schedule("rsqrt"), {**_warmup_values(), **expected})
    assert float(_schedule("rsqrt")(40)) == pytest.approx(LR / 2, rel=1e-5)


def _numpy_like(tree, seed, fill):
    """A tree of float32 arrays shaped like `tree`, filled on the host by `fill(rng, shape)` (numpy's RNG:
    jax.random on many shapes costs seconds of compilation on CPU)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda leaf: jnp.asarray(fill(rng, leaf.shape), jnp.float32), tree)


@functools.cache
def _param_shapes(use_bias=True):
    config = config_lib.default_config()
    apply_model_size(config, "test")
    config.model.update(max_len=16, use_bias=use_bias, tie_embeddings=False)
    model = build_model(build_model_config(config.model, 20, ONE_DEVICE))
    return nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16), jnp.int32))["params"])


def _params(use_bias=True):
    """The tiny model's parameter tree (1-D norm scales and biases, 2-D and 3-D kernels, embeddings), with
    non-zero values everywhere: zero-initialised biases would hide a decay (0 * (1 - lr * wd) == 0)."""
    return _numpy_like(_param_shapes(use_bias), 3, lambda rng, shape: 1.0 + rng.uniform(size=shape))


def _init_scale_params(use_bias=True):
    """Parameters of the size an initialised model has (std 0.02), so an update is visible against them."""
    return _numpy_like(_param_shapes(use_bias), 4, lambda rng, shape: 0.02 * rng.normal(size=shape))


def _one_update_with_zero_grads(params, lr, wd):
    tx, _ = build_optimizer(_opt(schedule="constant", learning_rate=lr, warmup_steps=0, weight_decay=wd), TOTAL)

    @jax.jit
    def update(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        updates, _ = tx.update(zeros, tx.init(params), params)
        return optax.apply_updates(params, updates)

    return update(params)


def test_weight_decay_shrinks_matrices_and_leaves_1d_params():
    params = _params()
    lr, wd = 0.01, 0.1
    new = _one_update_with_zero_grads(params, lr, wd)
    flat_old = jax.tree_util.tree_leaves_with_path(params)
    flat_new = dict(jax.tree_util.tree_leaves_with_path(new))
    names_1d = [jax.tree_util.keystr(path) for path, leaf in flat_old if leaf.ndim == 1]
    assert any("scale" in n for n in names_1d) and any("bias" in n for n in names_1d), names_1d
    kernels = 0
    for path, old in flat_old:
        name = jax.tree_util.keystr(path)
        old, updated = np.asarray(old), np.asarray(flat_new[path])
        if old.ndim == 1:
            np.testing.assert_array_equal(updated, old, err_msg=f"{name} (1-D) must not be decayed")
        elif "bias" not in name:  # kernels (2-D and 3-D) and embeddings
            kernels += 1
            np.testing.assert_allclose(updated, old * (1 - lr * wd), rtol=1e-6, err_msg=name)
            assert np.all(updated < old), f"{name} was not decayed"
    assert kernels >= 8 and {leaf.ndim for _, leaf in flat_old} >= {1, 2, 3}


def test_weight_decay_skips_every_bias():
    params = _params()
    new = _one_update_with_zero_grads(params, 0.01, 0.1)
    decayed = [jax.tree_util.keystr(path) for path, old in jax.tree_util.tree_leaves_with_path(params)
               if "bias" in jax.tree_util.keystr(path)
               and not np.array_equal(np.asarray(old), np.asarray(_leaf(new, path)))]
    assert not decayed, f"biases were weight-decayed: {decayed}"


def _leaf(tree, path):
    for entry in path:
        tree = tree[entry.key]
    return tree


def test_decay_mask_marks_matrices():
    params = {"w": jnp.ones((3, 4)), "k": jnp.ones((2, 3, 4)), "b": jnp.ones((4,)), "s": jnp.ones(())}
    assert decay_mask(params) == {"w": True, "k": True, "b": False, "s": False}


def _global_norm(tree):
    return math.sqrt(sum(float(np.sum(np.square(np.asarray(leaf, np.float64)))) for leaf in jax.tree.leaves(tree)))


def _scaled(tree, scale):
    return jax.tree.map(lambda leaf: jnp.asarray(np.asarray(leaf) * np.float32(scale)), tree)


def _random_grads(params, seed, norm):
    grads = _numpy_like(params, seed, lambda rng, shape: rng.normal(size=shape))
    return _scaled(grads, norm / _global_norm(grads))



def _max_rel_diff(a, b):
    a, b = jax.device_get((a, b))
    return max(float(np.linalg.norm(x - y) / np.linalg.norm(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_grad_clipping_equals_adamw_on_rescaled_gradients():
    params = _init_scale_params()
    clip = 0.5
    opt = _opt(schedule="constant", warmup_steps=0, weight_decay=0.1, grad_clip_norm=clip)
    tx, schedule = build_optimizer(opt, TOTAL)
    # Adam's first step is nearly scale-invariant, so use steps of very different norms: the first is clipped
    # (norm 50 -> 0.5), the second is below the threshold (norm 0.1) and stays as it is.
    grads_list = [_random_grads(params, 1, 50.0), _random_grads(params, 2, 0.1)]
    reference_tx = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
                               mask=decay_mask)
    clipped_list = [_scaled(grads, min(1.0, clip / _global_norm(grads))) for grads in grads_list]
    assert _global_norm(clipped_list[0]) == pytest.approx(clip, rel=1e-5)
    assert _global_norm(clipped_list[1]) == pytest.approx(0.1, rel=1e-5)
    ours = run_updates(tx, params, grads_list)
    expected = run_updates(reference_tx, params, clipped_list)
    assert _max_rel_diff(ours, expected) < 1e-5
    # the comparison can tell: without clipping the result is measurably different
    unclipped = run_updates(reference_tx, params, grads_list)
    assert _max_rel_diff(unclipped, expected) > 1e-3


def test_grad_clip_zero_is_plain_adamw():
    params = _init_scale_params(use_bias=False)
    opt = _opt(schedule="constant", warmup_steps=0, grad_clip_norm=0.0)
    tx, schedule = build_optimizer(opt, TOTAL)
    grads_list = [_random_grads(params, 1, 50.0), _random_grads(params, 2, 0.1)]
    reference_tx = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
                               mask=decay_mask)
    assert _max_rel_diff(run_updates(tx, params, grads_list), run_updates(reference_tx, params, grads_list)) < 1e-6
