"""model.scan_layers (one nn.scan over a stacked Block) and model.remat: the scanned stack computes what the loop
computes, every remat policy what no remat computes, and every place that reads or addresses parameters by
layer (converters, init_from, HF import/export, freeze, layer decay, lr multipliers, sharding, resume) works
in both layouts or fails with an error that names the key."""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from configs.encoders import BERT_ARCHITECTURE
from configs.model_sizes import apply_model_size
from conftest import needs, run_updates
from llm_jax import config as config_lib
from llm_jax.errors import ConfigError
from llm_jax.interop import hf_bert
from llm_jax.models import layer_layout, stack
from llm_jax.models.families import build_model
from llm_jax.models.model_config import ModelConfig, build_model_config
from llm_jax.models.remat import REMAT_POLICIES
from llm_jax.sharding import build_mesh, logical_rules
from llm_jax.training import run_record
from llm_jax.training.init_from import init_params_from
from llm_jax.training.optimizer import build_optimizer, frozen_mask, trainable_grad_norm
from llm_jax.training.state import init_state, state_shardings

VOCAB = 40
FAMILIES = ("decoder", "encoder")


def _model_config(family: str = "decoder", **changes) -> ModelConfig:
    """The `test` size (2 layers, d_model 32) with 3 layers, so a stack is more than a pair; the encoder is a BERT
    (post-LN, biases, token types, pooler) and the decoder uses ALiBi (a per-stack attention bias)."""
    config = config_lib.default_config()
    apply_model_size(config, "test")
    config.model.update(num_layers=3, max_len=16)
    if family == "encoder":
        config.model.update(**BERT_ARCHITECTURE)
        config.model.update(max_len=16)
    else:
        config.model.update(positional="alibi", use_bias=True)
    config.model.update(**changes)
    heads = ("mlm",) if family == "encoder" else ("lm",)
    return build_model_config(config.model, VOCAB, {}, heads)


def _inputs(seed: int = 0) -> dict[str, jax.Array]:
    """Two packed rows: segment ids (and the positions they imply) reach every layer of the stack."""
    rng = np.random.default_rng(seed)
    segments = np.array([[1] * 5 + [2] * 6 + [0] * 5, [1] * 16])
    return {"tokens_BT": jnp.asarray(rng.integers(1, VOCAB, size=(2, 16)), jnp.int32),
            "segment_ids_BT": jnp.asarray(segments, jnp.int32)}


def _init(cfg: ModelConfig, seed: int = 0) -> dict:
    init = jax.jit(lambda key: build_model(cfg).init(key, **_inputs())["params"])
    return nn.unbox(init(jax.random.key(seed)))


def _loss_fn(cfg: ModelConfig):
    """params -> a scalar of every logit (weighted, so each one's gradient differs), as the tests compare it."""
    model = build_model(cfg)
    head = "mlm" if cfg.family == "encoder" else "lm"

    def loss(params):
        logits_BTV = model.apply({"params": params}, **_inputs()).heads[head][..., :cfg.vocab_size]
        weights_V = jnp.linspace(-1.0, 1.0, cfg.vocab_size)
        return jnp.mean(jnp.tanh(logits_BTV) * weights_V), logits_BTV

    return loss


def _value_and_grad(cfg: ModelConfig, params) -> tuple[tuple[jax.Array, jax.Array], dict]:
    """((loss, logits), gradients) of _loss_fn, compiled (op-by-op dispatch would take most of the test's time)."""
    return jax.jit(jax.value_and_grad(_loss_fn(cfg), has_aux=True))(params)


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    flat_a = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(a)}
    flat_b = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(b)}
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        np.testing.assert_allclose(np.asarray(flat_a[key]), np.asarray(flat_b[key]), rtol=rtol, atol=atol,
                                   err_msg=key)


def _tree_equal(a, b) -> bool:
    same = jax.tree.structure(a) == jax.tree.structure(b)
    return same and all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ----------------------------------------------------------------------------- converters


def _random_tree(seed: int = 0) -> dict:
    """An encoder-decoder-like tree: two stacks at depth 1, one at the top, other parameters around them."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.normal(size=shape).astype(np.float32)  # noqa: E731
    block = lambda: {"attention": {"query": {"kernel": normal(4, 2, 2)}},  # noqa: E731
                     "mlp_norm": {"scale": normal(4)}}
    return {"token_embedding": {"embedding": normal(8, 4)},
            **{f"block_{i}": block() for i in range(3)},
            "encoder": {**{f"block_{i}": block() for i in range(2)}, "final_norm": {"scale": normal(4)}},
            "decoder": {f"block_{i}": block() for i in range(4)}}


def test_converters_round_trip_exactly_at_any_depth():
    looped = _random_tree()
    scanned = layer_layout.to_scanned(looped)
    assert sorted(scanned) == ["blocks", "decoder", "encoder", "token_embedding"]
    assert scanned["blocks"]["attention"]["query"]["kernel"].shape == (3, 4, 2, 2)
    assert scanned["encoder"]["blocks"]["mlp_norm"]["scale"].shape == (2, 4)
    np.testing.assert_array_equal(scanned["decoder"]["blocks"]["mlp_norm"]["scale"][2],
                                  looped["decoder"]["block_2"]["mlp_norm"]["scale"])
    assert _tree_equal(layer_layout.to_looped(scanned), looped)
    assert _tree_equal(layer_layout.to_scanned(layer_layout.to_looped(scanned)), scanned)
    assert _tree_equal(layer_layout.to_layout(scanned, True), scanned)  # idempotent
    assert _tree_equal(layer_layout.to_layout(looped, False), looped)
    jax_scanned = layer_layout.to_scanned(jax.tree.map(jnp.asarray, looped))  # jax arrays stack too
    assert _tree_equal(jax.device_get(jax_scanned), scanned)


def test_converters_reject_trees_that_are_neither_layout():
    with pytest.raises(ValueError, match=r"numbered \[0, 2\]"):
        layer_layout.to_scanned({"block_0": {"w": np.ones(2)}, "block_2": {"w": np.ones(2)}})
    with pytest.raises(ValueError, match="different parameter trees"):
        layer_layout.to_scanned({"block_0": {"w": np.ones(2)}, "block_1": {"v": np.ones(2)}})
    with pytest.raises(ValueError, match="neither layout"):
        layer_layout.to_looped({"blocks": {"w": np.ones((2, 2))}, "block_0": {"w": np.ones(2)}})


# ----------------------------------------------------------------------------- the scanned stack


@pytest.mark.parametrize("family", FAMILIES)
def test_scanned_logits_and_gradients_equal_looped(family):
    looped_cfg = _model_config(family)
    scanned_cfg = looped_cfg.replace(scan_layers=True)
    params = _init(looped_cfg)
    scanned_init = _init(scanned_cfg)
    assert "blocks" in scanned_init and "block_0" not in scanned_init
    assert jax.tree.map(np.shape, scanned_init) == jax.tree.map(np.shape, layer_layout.to_scanned(params))
    (loss, logits), grads = _value_and_grad(looped_cfg, params)
    (scan_loss, scan_logits), scan_grads = _value_and_grad(scanned_cfg, layer_layout.to_scanned(params))
    np.testing.assert_allclose(scan_logits, logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scan_loss, loss, rtol=1e-6)
    _assert_trees_close(layer_layout.to_looped(scan_grads), grads)
    assert float(jnp.abs(grads["block_0"]["mlp"]["up"]["kernel"]).max()) > 0  # the comparison is not of zeros


def test_scanned_layers_differ_from_each_other():
    """nn.scan splits the params rng: the stacked layers are not copies of one initialisation."""
    kernel = _init(_model_config(scan_layers=True))["blocks"]["mlp"]["up"]["kernel"]
    assert not np.allclose(kernel[0], kernel[1])


def test_dropout_runs_inside_the_scanned_stack():
    """Training mode reaches the scanned blocks: the dropout key changes the output, evaluation drops nothing."""
    cfg = _model_config(scan_layers=True, dropout=0.5)
    model = build_model(cfg)
    params = _init(cfg)
    hidden = jax.jit(lambda key, deterministic: model.apply(
        {"params": params}, **_inputs(), deterministic=deterministic, rngs={"dropout": key}).hidden_BTD,
        static_argnums=1)
    out_a, out_b = hidden(jax.random.key(1), False), hidden(jax.random.key(2), False)
    out_eval = hidden(jax.random.key(1), True)
    assert not np.allclose(out_a, out_b) and not np.allclose(out_a, out_eval)


class _CrossStack(nn.Module):
    """A decoder stack of cross-attention blocks over an encoder output, as an encoder-decoder family builds it."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BTD, encoded_BSD, encoded_segment_ids_BS):
        positions_BT = stack.positions_from_segments(None, x_BTD.shape[:2])
        segment_ids_BT = jnp.ones(x_BTD.shape[:2], jnp.int32)
        return stack.blocks(self.config, x_BTD, positions_BT, segment_ids_BT, True, causal=True, cross=True,
                            encoded_BSD=encoded_BSD, encoded_segment_ids_BS=encoded_segment_ids_BS)


def test_scanned_cross_attention_blocks_equal_looped():
    cfg = _model_config(positional="learned")
    rng = np.random.default_rng(0)
    x_BTD = jnp.asarray(rng.normal(size=(2, 6, cfg.d_model)), jnp.float32)
    encoded_BSD = jnp.asarray(rng.normal(size=(2, 9, cfg.d_model)), jnp.float32)
    encoded_segment_ids_BS = jnp.asarray([[1] * 9, [1] * 4 + [0] * 5], jnp.int32)
    args = (x_BTD, encoded_BSD, encoded_segment_ids_BS)
    params = nn.unbox(_CrossStack(cfg).init(jax.random.key(0), *args)["params"])
    assert "cross_attention" in params["block_2"]
    looped = _CrossStack(cfg).apply({"params": params}, *args)
    scanned = _CrossStack(cfg.replace(scan_layers=True)).apply({"params": layer_layout.to_scanned(params)}, *args)
    np.testing.assert_allclose(scanned, looped, rtol=1e-5, atol=1e-6)
    def scanned_with(encoded):
        return _CrossStack(cfg.replace(scan_layers=True)).apply({"params": layer_layout.to_scanned(params)}, x_BTD,
                                                                 encoded, encoded_segment_ids_BS)

    # the encoder output and its segment ids reach the scanned layers: a padding key changes nothing, a real one does
    np.testing.assert_allclose(scanned_with(encoded_BSD.at[1, 6].set(100.0)), scanned, rtol=1e-5, atol=1e-6)
    assert not np.allclose(scanned_with(encoded_BSD.at[1, 2].set(100.0))[1], scanned[1])


# ----------------------------------------------------------------------------- remat


@pytest.mark.parametrize("scan_layers", [False, True])
@pytest.mark.parametrize("policy", [name for name in REMAT_POLICIES.names() if name != "none"])
def test_remat_policy_gives_the_same_loss_and_gradients(policy, scan_layers):
    base = _model_config(scan_layers=scan_layers)
    params = _init(base)
    (loss, _), grads = _value_and_grad(base, params)
    (remat_loss, _), remat_grads = _value_and_grad(base.replace(remat=policy), params)
    remat_fn = lambda p: _loss_fn(base.replace(remat=policy))(p)[0]  # noqa: E731
    np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
    _assert_trees_close(remat_grads, grads)
    assert _uses_checkpoint(remat_fn, params)  # the policy did put the blocks under jax.checkpoint


def _uses_checkpoint(loss_fn, params) -> bool:
    """Whether the program holds jax.checkpoint (its primitive prints as remat2, or checkpoint in other jaxes)."""
    return re.search(r"\b(remat2|checkpoint)\[", str(jax.make_jaxpr(loss_fn)(params))) is not None


def test_no_remat_has_no_checkpoint():
    cfg = _model_config()
    assert not _uses_checkpoint(lambda p: _loss_fn(cfg)(p)[0], _init(cfg))


def test_full_remat_needs_less_temporary_memory():
    """What the policies are for: the compiled gradient of a deeper, wider stack keeps fewer activations."""
    cfg = _model_config(scan_layers=True, num_layers=6, d_model=64)
    params = _init(cfg)

    def temp_bytes(remat: str) -> int:
        grad = jax.jit(jax.grad(lambda p: _loss_fn(cfg.replace(remat=remat))(p)[0]))
        return grad.lower(params).compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes("full") < temp_bytes("none")


# ----------------------------------------------------------------------------- init_from, HF import and export


def _write_source(workdir, cfg: ModelConfig, params) -> None:
    """A work directory as llm_jax.train leaves it (config.json, checkpoints/1/state) holding `params`."""
    import json
    import os

    from llm_jax.models.model_config import model_config_to_json
    from llm_jax.training.checkpoint import Checkpointer
    from llm_jax.training.state import TrainState

    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump({"config": {}, "model_config": model_config_to_json(cfg)}, f)
    params = jax.tree.map(jnp.asarray, params)
    state = TrainState(step=jnp.asarray(1, jnp.int32), params=params, opt_state=optax.adam(1e-3).init(params),
                       rng=jax.random.key_data(jax.random.key(0)))
    with Checkpointer(os.path.join(workdir, "checkpoints"), keep=1, async_save=False) as checkpointer:
        checkpointer.save(1, state, {"step": 1})


@pytest.mark.parametrize("source_scanned", [False, True])
def test_init_from_across_layouts_gives_the_same_logits(tmp_path, source_scanned):
    source_cfg = _model_config("encoder", scan_layers=source_scanned)
    target_cfg = source_cfg.replace(scan_layers=not source_scanned)
    source_params = _init(source_cfg, seed=1)
    _write_source(str(tmp_path / "source"), source_cfg, source_params)
    target = jax.device_get(_init(target_cfg, seed=2))
    merged, report = init_params_from(str(tmp_path / "source"), target, target_cfg)
    assert layer_layout.is_scanned(merged) == target_cfg.scan_layers
    assert "block_2/mlp/up/kernel" in report["loaded"] and not report["new"] and not report["dropped"]
    np.testing.assert_allclose(_value_and_grad(target_cfg, merged)[0][1],
                               _value_and_grad(source_cfg, source_params)[0][1], rtol=1e-5, atol=1e-6)


def _bert_config(scan_layers: bool) -> ModelConfig:
    hf_config = {"model_type": "bert", "architectures": ["BertForMaskedLM"], "vocab_size": VOCAB,
                 "hidden_size": 16, "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 32,
                 "hidden_act": "gelu", "max_position_embeddings": 16, "type_vocab_size": 2}
    return ModelConfig(**hf_bert.model_config_from_hf(hf_config)).replace(scan_layers=scan_layers)


def test_hf_bert_import_and_export_in_the_scanned_layout():
    looped_cfg, scanned_cfg = _bert_config(False), _bert_config(True)
    params = jax.device_get(nn.unbox(build_model(looped_cfg).init(jax.random.key(0), _inputs()["tokens_BT"])))
    state_dict = hf_bert.params_to_hf(params["params"], looped_cfg)
    scanned = hf_bert.hf_to_params(state_dict, scanned_cfg)
    assert "blocks" in scanned and "block_0" not in scanned
    expected_shapes = jax.eval_shape(build_model(scanned_cfg).init, jax.random.key(0), _inputs()["tokens_BT"])
    assert jax.tree.map(np.shape, scanned) == jax.tree.map(np.shape, nn.unbox(expected_shapes)["params"])
    assert _tree_equal(layer_layout.to_looped(scanned), hf_bert.hf_to_params(state_dict, looped_cfg))
    exported = hf_bert.params_to_hf(scanned, scanned_cfg)  # convert --to=hf of a scanned run
    assert exported.keys() == state_dict.keys()
    assert all(np.array_equal(exported[key], state_dict[key]) for key in state_dict)


# ----------------------------------------------------------------------------- freeze, layer decay, lr multipliers


def _opt(**changes) -> ml_collections.ConfigDict:
    opt = config_lib.default_config().optimizer
    opt.update(warmup_steps=0, schedule="constant", learning_rate=0.1, weight_decay=0.1, grad_clip_norm=1.0)
    opt.update(**changes)
    return opt


def _updated_both_ways(opt, freeze=(), grads_scale=None):
    """(looped params after two updates, the same run in the scanned layout converted back) from equal starts."""
    cfg = _model_config()
    params = _init(cfg)
    rng = np.random.default_rng(0)
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
    if grads_scale:
        grads = grads_scale(grads)
    results = []
    for to_layout in (lambda t: t, layer_layout.to_scanned):
        start, g = to_layout(params), to_layout(grads)
        tx, _ = build_optimizer(opt, 100, start, freeze, cfg.num_layers)
        results.append(layer_layout.to_looped(run_updates(tx, start, [g, g])))
    return params, results[0], results[1]


def test_layer_decay_in_the_scanned_layout_equals_looped():
    params, looped, scanned = _updated_both_ways(_opt(layer_decay=0.5, lr_multipliers=(("blocks?.*/mlp/.*", 3.0),)))
    _assert_trees_close(scanned, looped)
    step_0 = np.abs(looped["block_0"]["mlp"]["up"]["kernel"] - params["block_0"]["mlp"]["up"]["kernel"]).max()
    step_2 = np.abs(looped["block_2"]["mlp"]["up"]["kernel"] - params["block_2"]["mlp"]["up"]["kernel"]).max()
    assert step_0 < 0.5 * step_2  # the decay is in force, in both


def test_freeze_first_layers_in_the_scanned_layout_equals_looped():
    """layers:1 on a stack freezes row 0 of every stacked leaf: bit-identical there, and the clipping norm sees
    only the trainable rows (huge gradients in layer 0 would otherwise shrink every other update)."""
    huge_first = lambda g: {**g, "block_0": jax.tree.map(lambda x: x * 1e4, g["block_0"])}  # noqa: E731
    params, looped, scanned = _updated_both_ways(_opt(), ("layers:1",), huge_first)
    _assert_trees_close(scanned, looped)
    assert _tree_equal(scanned["block_0"], params["block_0"])
    assert not np.allclose(scanned["block_1"]["mlp"]["up"]["kernel"], params["block_1"]["mlp"]["up"]["kernel"])


def test_frozen_mask_of_a_stack_is_per_layer_and_grad_norm_matches():
    cfg = _model_config()
    looped = _init(cfg)
    scanned = layer_layout.to_scanned(looped)
    mask = frozen_mask(scanned, ("layers:2",), cfg.num_layers)
    kernel_mask = mask["blocks"]["mlp"]["up"]["kernel"]
    assert kernel_mask.shape == (3, 1, 1) and kernel_mask[:, 0, 0].tolist() == [True, True, False]
    assert mask["token_embedding"]["embedding"] is False
    assert frozen_mask(scanned, ("layers:3", "embeddings"), 3)["blocks"]["mlp"]["up"]["kernel"] is True
    grads = jax.tree.map(lambda p: p * 2.0, looped)
    expected = trainable_grad_norm(grads, frozen_mask(looped, ("layers:2",), 3))
    np.testing.assert_allclose(trainable_grad_norm(layer_layout.to_scanned(grads), mask), expected, rtol=1e-6)


def test_single_block_regexes_on_a_scanned_model_fail_naming_the_key():
    scanned = layer_layout.to_scanned(_init(_model_config()))
    with pytest.raises(ConfigError, match=r"train.freeze item 'block_0/\.\*'.*model.scan_layers=True.*layers:K"):
        frozen_mask(scanned, ("block_0/.*",), 3)
    with pytest.raises(ConfigError, match=r"optimizer.lr_multipliers regex 'block_1/.*'.*model.scan_layers"):
        build_optimizer(_opt(lr_multipliers=(("block_1/.*", 2.0),)), 10, scanned, (), 3)
    assert frozen_mask(scanned, ("blocks/mlp/.*",), 3)["blocks"]["mlp"]["up"]["kernel"] is True


# ----------------------------------------------------------------------------- sharding, config, resume


def test_stacked_params_get_the_layers_axis_and_shard_on_a_mesh():
    needs(jax.device_count() >= 8, "needs 8 devices (XLA_FLAGS from conftest)")
    cfg = _model_config(scan_layers=True)
    model = build_model(cfg)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), **_inputs()))["params"]
    assert boxed["blocks"]["mlp"]["up"]["kernel"].names == ("layers", "embed", "mlp")
    assert boxed["blocks"]["attention"]["query"]["kernel"].names[0] == "layers"
    config = config_lib.default_config()
    mesh, rules = build_mesh({"data": 2, "fsdp": 2, "tensor": 2}), logical_rules(config.mesh)
    tx = optax.adam(1e-3)
    inputs = lambda: {k: v[:1] for k, v in _inputs().items()}  # noqa: E731
    with nn.logical_axis_rules(rules):  # as build_run: shardings first, then init on the mesh
        shardings = state_shardings(model, tx, inputs, mesh, rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state = init_state(model, tx, inputs, 0, shardings)
        logits = jax.jit(lambda p: model.apply({"params": p}, **_inputs()).heads["lm"])(state.params)
    kernel = state.params["blocks"]["mlp"]["up"]["kernel"]
    assert kernel.sharding.spec == P(None, "fsdp", "tensor") and kernel.shape == (3, 32, 128)
    assert kernel.addressable_shards[0].data.shape == (3, 16, 64)  # every layer, half of embed, half of mlp
    assert state.opt_state[0].mu["blocks"]["mlp"]["up"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")
    unsharded = model.apply({"params": jax.device_get(state.params)}, **_inputs()).heads["lm"]
    np.testing.assert_allclose(jax.device_get(logits), unsharded, rtol=1e-5, atol=1e-5)


def test_model_keys_are_declared_and_validated():
    config = config_lib.default_config()
    assert config.model.scan_layers is False and config.model.remat == "none"
    assert config_lib.SCHEMA["model"]["remat"].free_on_resume
    assert not config_lib.SCHEMA["model"]["scan_layers"].free_on_resume
    assert ("layers", None) in config_lib.DEFAULT_LOGICAL_AXIS_RULES
    config.model.remat = "some"
    with pytest.raises(ConfigError, match="model.remat='some' is not one of full, none, save_dots, save_names"):
        config_lib.validate(config, 1)


def test_resume_refuses_a_layout_change_naming_the_key(tmp_path):
    before = config_lib.default_config()
    record = {"config": config_lib.config_to_dict(before), "starts": []}
    now = config_lib.default_config()
    now.model.update(scan_layers=True, remat="full")
    for allow in (False, True):
        with pytest.raises(ConfigError, match=r"model.scan_layers=False.*model.scan_layers=True.*init_from"):
            run_record.check_resume(record, now, str(tmp_path), allow_config_change=allow)
    now.model.scan_layers = False  # remat alone changes only the program
    assert run_record.check_resume(record, now, str(tmp_path), allow_config_change=False) == {
        "model.remat": ["none", "full"]}
