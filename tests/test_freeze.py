"""train.freeze (frozen parameters stay bit-identical, clipping sees trainable gradients only) and
optimizer.layer_decay (block i's updates scaled by decay^(L-i))."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import run_updates
from configs.model_sizes import MODEL_SIZES, apply_model_size
from llm_jax import config as config_lib
from llm_jax.errors import ConfigError
from llm_jax.models.families import build_model
from llm_jax.models.model_config import build_model_config
from llm_jax.training.optimizer import (HEAD_PARAMS, build_optimizer, check_optimizer_config, frozen_mask,
                                        layer_scales, param_path, trainable_grad_norm)

NUM_LAYERS = MODEL_SIZES.get("test")["num_layers"]
ONE_DEVICE = {"data": 1, "fsdp": 1, "tensor": 1}


def _opt(**changes):
    opt = config_lib.default_config().optimizer
    opt.update(schedule="constant", learning_rate=1e-2, warmup_steps=0, weight_decay=0.1, grad_clip_norm=1.0)
    opt.update(**changes)
    return opt


@functools.cache
def _model_shapes():
    """The tiny decoder's abstract parameter tree: embeddings, block_0, block_1, final_norm, output_head."""
    config = config_lib.default_config()
    apply_model_size(config, "test")
    config.model.update(max_len=16, use_bias=True, tie_embeddings=False)
    model = build_model(build_model_config(config.model, 20, ONE_DEVICE))
    return nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16), jnp.int32))["params"])


def _layout_shapes():
    """A hand-written tree with every kind of parameter (embeddings, blocks, pooler, all the heads)."""
    def dense(n_in, n_out):
        return {"kernel": (n_in, n_out), "bias": (n_out,)}

    def norm(d):
        return {"scale": (d,), "bias": (d,)}

    def block():
        return {"attention": {name: dense(8, 8) for name in ("query", "key", "value", "out")},
                "attention_norm": norm(8), "mlp": {"up": dense(8, 16), "down": dense(16, 8)}, "mlp_norm": norm(8)}

    tree = {"token_embedding": {"embedding": (32, 8)}, "position_embedding": {"embedding": (16, 8)},
            "token_type_embedding": {"embedding": (2, 8)}, "embedding_norm": norm(8),
            **{f"block_{i}": block() for i in range(3)}, "final_norm": norm(8), "pooler": dense(8, 8),
            "output_head": {"dense": dense(8, 32)},
            "mlm_head": {"transform": dense(8, 8), "transform_norm": norm(8), "output_bias": (32,)},
            "nsp_head": dense(8, 2), "classifier": dense(8, 3), "token_classifier": dense(8, 5),
            "crf": {"transitions": (5, 5), "start": (5,), "end": (5,)}}
    return jax.tree.map(lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32), tree,
                        is_leaf=lambda x: isinstance(x, tuple))


def _filled(shapes, seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(scale * rng.normal(size=s.shape), jnp.float32), shapes)


def _paths(tree):
    return {param_path(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _frozen_paths(mask):
    return {path for path, frozen in _paths(mask).items() if frozen}


def _run(tx, params, grads_list):
    return jax.device_get(run_updates(tx, params, grads_list))


def test_frozen_embeddings_and_first_layer_stay_bit_identical():
    shapes = _model_shapes()
    params = _filled(shapes, 0, 0.02)
    tx, _ = build_optimizer(_opt(), 100, shapes, freeze=("embeddings", "layers:1"), num_layers=NUM_LAYERS)
    new = _paths(_run(tx, params, [_filled(shapes, seed) for seed in (1, 2, 3)]))
    old = _paths(jax.device_get(params))
    frozen = {p for p in old if p.startswith(("token_embedding/", "position_embedding/", "block_0/"))}
    assert frozen and any(p.startswith("block_1/") for p in old) and any(p.startswith("output_head/") for p in old)
    for path in old:
        if path in frozen:
            np.testing.assert_array_equal(new[path], old[path], err_msg=f"{path} is frozen")
        else:
            assert np.all(new[path] != old[path]), f"{path} is trainable and did not move everywhere"


def test_frozen_parameters_get_no_adam_moments():
    shapes = _model_shapes()
    tx, _ = build_optimizer(_opt(), 100, shapes, freeze=("embeddings", "layers:1"), num_layers=NUM_LAYERS)
    state = jax.eval_shape(tx.init, shapes)
    trainable = sum(leaf.size for path, leaf in _paths(shapes).items()
                    if not path.startswith(("token_embedding/", "position_embedding/", "block_0/")))
    moments = sum(leaf.size for leaf in jax.tree.leaves(state) if leaf.ndim > 0)
    assert moments == 2 * trainable  # mu and nu for trainable parameters only


def test_all_but_heads_freezes_everything_outside_the_heads():
    shapes = _layout_shapes()
    frozen = _frozen_paths(frozen_mask(shapes, ["all_but_heads"], 3))
    for path in _paths(shapes):
        assert (path in frozen) == (path.split("/")[0] not in HEAD_PARAMS), path
    assert "pooler/kernel" in frozen and "block_2/mlp/up/kernel" in frozen and "crf/start" not in frozen


def test_layers_k_freezes_the_first_k_blocks_only():
    frozen = _frozen_paths(frozen_mask(_layout_shapes(), ("layers:2",), 3))
    assert {path.split("/")[0] for path in frozen} == {"block_0", "block_1"}


def test_regex_items_match_whole_paths():
    shapes = _layout_shapes()
    assert _frozen_paths(frozen_mask(shapes, (".*attention/query/.*",), 3)) == {
        f"block_{i}/attention/query/{name}" for i in range(3) for name in ("kernel", "bias")}
    block_0 = _frozen_paths(frozen_mask(shapes, ("block_0/.*", "crf/start"), 3))
    assert len(block_0) == 17 and "crf/start" in block_0 and all(
        p.startswith("block_0/") or p == "crf/start" for p in block_0)


def test_an_item_matching_nothing_is_an_error():
    with pytest.raises(ConfigError, match=r"train.freeze item 'decoder/.\*' matches no parameter; top-level "
                                          r"parameters are .*block_0.*token_embedding"):
        frozen_mask(_layout_shapes(), ("embeddings", "decoder/.*"), 3)
    with pytest.raises(ConfigError, match="'layers:4'.*has 3"):
        frozen_mask(_layout_shapes(), ("layers:4",), 3)
    with pytest.raises(ConfigError, match="'layers:x'"):
        frozen_mask(_layout_shapes(), ("layers:x",), 3)
    with pytest.raises(ConfigError, match=r"'block_\('"):
        frozen_mask(_layout_shapes(), ("block_(",), 3)


def test_trainable_grad_norm_ignores_frozen_gradients():
    shapes = _layout_shapes()
    mask = frozen_mask(shapes, ("all_but_heads",), 3)
    grads = _filled(shapes, 5)
    grads = jax.tree.map(lambda g, frozen: g * 1e4 if frozen else g, grads, mask)
    expected = np.sqrt(sum(np.sum(np.square(np.asarray(g, np.float64))) for path, g in _paths(grads).items()
                           if path.split("/")[0] in HEAD_PARAMS))
    np.testing.assert_allclose(float(trainable_grad_norm(grads, mask)), expected, rtol=1e-5)  # static mask
    np.testing.assert_allclose(float(jax.jit(trainable_grad_norm)(grads, mask)), expected, rtol=1e-5)  # traced
    assert float(trainable_grad_norm(grads, None)) > 100 * expected


def test_clipping_sees_only_trainable_gradients():
    shapes = _model_shapes()
    params = _filled(shapes, 0, 0.02)
    freeze = ("embeddings", "layers:1")
    mask = frozen_mask(shapes, freeze, NUM_LAYERS)
    # eps large enough that Adam's update depends on the gradient scale, so a wrong clip factor shows
    opt = _opt(grad_clip_norm=0.5, eps=1e-2)
    tx, _ = build_optimizer(opt, 100, shapes, freeze=freeze, num_layers=NUM_LAYERS)
    grads = _filled(shapes, 1, 0.1)
    huge_frozen = jax.tree.map(lambda g, frozen: g * 1e4 if frozen else g, grads, mask)
    zero_frozen = jax.tree.map(lambda g, frozen: jnp.zeros_like(g) if frozen else g, grads, mask)
    assert float(trainable_grad_norm(grads, mask)) > 0.5  # the clip is active
    with_huge, with_zero = _paths(_run(tx, params, [huge_frozen])), _paths(_run(tx, params, [zero_frozen]))
    for path in with_zero:
        np.testing.assert_allclose(with_huge[path], with_zero[path], rtol=1e-6, err_msg=path)
    # the comparison can tell: clipping by the norm of all gradients moves the trainable leaves differently
    unfrozen, _ = build_optimizer(opt, 100)
    leaky = _paths(_run(unfrozen, params, [huge_frozen]))
    assert not np.allclose(leaky["output_head/dense/kernel"], with_zero["output_head/dense/kernel"], rtol=1e-3)


def test_layer_scales_follow_depth():
    scales = _paths(layer_scales(_layout_shapes(), 3, 0.5))
    assert scales["block_0/mlp/up/kernel"] == 0.5 ** 3 and scales["block_2/attention/out/bias"] == 0.5
    assert scales["token_embedding/embedding"] == 0.5 ** 4 == scales["embedding_norm/scale"]
    assert all(scales[p] == 1.0 for p in ("final_norm/scale", "pooler/kernel", "crf/transitions",
                                          "mlm_head/output_bias", "classifier/bias"))


@pytest.mark.parametrize("freeze", [(), ("layers:1",)])
def test_layer_decay_scales_each_update(freeze):
    """With identical gradients, no weight decay and no clipping, Adam's first update is -lr * sign(g) per
    element: the layer scale is then the ratio of the update to -lr."""
    shapes = _model_shapes()
    params = _filled(shapes, 0, 0.02)
    lr, decay = 1e-2, 0.5
    opt = _opt(learning_rate=lr, weight_decay=0.0, grad_clip_norm=0.0, eps=1e-12, layer_decay=decay)
    tx, _ = build_optimizer(opt, 100, shapes, freeze=freeze, num_layers=NUM_LAYERS)
    new = _paths(_run(tx, params, [jax.tree.map(jnp.ones_like, params)]))
    old = _paths(jax.device_get(params))
    expected = {"token_embedding": decay ** 3, "position_embedding": decay ** 3, "block_0": decay ** 2,
                "block_1": decay, "final_norm": 1.0, "output_head": 1.0}
    for path in old:
        top = path.split("/")[0]
        scale = 0.0 if freeze and top == "block_0" else expected[top]
        np.testing.assert_allclose(new[path] - old[path], -lr * scale, rtol=1e-4, atol=1e-9, err_msg=path)


def test_layer_decay_must_be_in_zero_one():
    check_optimizer_config(_opt(layer_decay=1.0))
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ConfigError, match=rf"optimizer.layer_decay={bad} must be in \(0, 1\]"):
            build_optimizer(_opt(layer_decay=bad), 100)


def test_defaults_keep_the_plain_chain():
    tx, _ = build_optimizer(_opt(), 100)
    state = tx.init({"w": jnp.ones((2, 2))})
    assert not isinstance(state, optax.PartitionState)
    with pytest.raises(ValueError, match="needs params"):
        build_optimizer(_opt(), 100, freeze=("embeddings",))


def test_frozen_state_maps_params_like_shardings_with_masked_nodes_kept():
    """state.py maps shardings over the optimizer state with optax.tree_map_params: with frozen parameters it
    needs is_leaf for MaskedNode and must keep those nodes (the recipe in build_optimizer's docstring)."""
    shapes = _model_shapes()
    tx, _ = build_optimizer(_opt(layer_decay=0.8), 100, shapes, freeze=("embeddings",), num_layers=NUM_LAYERS)
    state = jax.eval_shape(tx.init, shapes)
    mapped = optax.tree_map_params(tx, lambda p, s: p if isinstance(p, optax.MaskedNode) else s, state,
                                   jax.tree.map(lambda _: "param", shapes), transform_non_params=lambda _: "other",
                                   is_leaf=lambda v: isinstance(v, optax.MaskedNode))
    assert jax.tree.structure(mapped) == jax.tree.structure(jax.tree.map(lambda _: "x", state))
    assert sum(leaf == "param" for leaf in jax.tree.leaves(mapped)) == 2 * sum(
        not p.startswith(("token_embedding/", "position_embedding/")) for p in _paths(shapes))


def test_lr_multipliers_scale_the_matching_updates():
    """optimizer.lr_multipliers: a factor on the updates of the parameters a path regex matches (e.g. a CRF
    that starts at zero beside a pretrained encoder), combined with layer decay."""
    shapes = _model_shapes()
    params = _filled(shapes, 0, 0.02)
    lr = 1e-3
    opt = _opt(learning_rate=lr, weight_decay=0.0, grad_clip_norm=0.0, eps=1e-12, layer_decay=0.5,
               lr_multipliers=(("output_head/.*", 100.0), ("block_1/mlp/.*", 3.0)))
    tx, _ = build_optimizer(opt, 100, shapes, num_layers=NUM_LAYERS)
    new = _paths(_run(tx, params, [jax.tree.map(jnp.ones_like, params)]))
    old = _paths(jax.device_get(params))
    for path, scale in (("output_head/dense/kernel", 100.0), ("block_1/mlp/up/kernel", 1.5),
                        ("block_1/attention/query/kernel", 0.5), ("block_0/mlp/up/kernel", 0.25)):
        np.testing.assert_allclose(new[path] - old[path], -lr * scale, rtol=1e-4, err_msg=path)
    for bad, message in (((("nothing/.*", 2.0),), "matches no parameter"), (((".*", -1.0),), "factor > 0")):
        with pytest.raises(ConfigError, match=message):
            build_optimizer(_opt(lr_multipliers=bad), 100, shapes, num_layers=NUM_LAYERS)
