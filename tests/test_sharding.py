"""One train step on 8 forced CPU devices equals the 1-device step, and parameters are sharded by the rules."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import needs
from configs.encoder_decoder import ENCODER_DECODER_STYLES
from configs.encoders import BERT_ARCHITECTURE
from configs.meshes import apply_mesh
from configs.model_sizes import apply_model_size
from llm_jax import config as config_lib
from llm_jax.errors import ConfigError
from llm_jax.models.model_config import build_model_config
from llm_jax.sharding import batch_shardings, global_batch, logical_rules, mesh_axes_of, vocab_shard_sizes
from llm_jax.training.run import build_run, model_inputs_fn
from llm_jax.training.state import init_state
from llm_jax.training.steps import make_train_step

needs(jax.device_count() >= 8, "needs 8 devices (XLA_FLAGS from conftest)")


def _config(text_path, use_bias=False, **mesh):
    """Tiny GQA model with an untied head. Biases are off by default: the key bias has an exactly-zero
    gradient in theory, so Adam turns its rounding noise into updates no two layouts agree on."""
    config = config_lib.default_config()
    apply_model_size(config, "test")
    config.model.update(num_kv_heads=2, max_len=16, use_bias=use_bias,
                        tie_embeddings=False)
    config.data.update(path=str(text_path), seq_len=16, pipeline="windows")
    config.train.update(batch_size=8, steps=10)
    config.optimizer.update(warmup_steps=0)
    config.mesh.update(data=1, fsdp=1, tensor=1)
    config.mesh.update(**mesh)
    return config


def _one_step(config, workdir, devices, start=None):
    """(state before, state after, metrics) of one train step of a new run of `config` on `devices`. The state
    before is initialised directly on its shards by init_state, or is `start` (a TrainState) placed on them."""
    run = build_run(config, str(workdir), devices=devices)
    with jax.set_mesh(run.mesh), run.rules_context():
        if start is None:
            state = init_state(run.model, run.tx, model_inputs_fn(run.task), 0, run.shardings)
        else:
            state = jax.device_put(start, run.shardings)
        shardings = batch_shardings(run.mesh, run.rules, run.task.batch_spec(), stacked=False)
        step = jax.jit(make_train_step(run.model, run.task, run.tx, run.schedule, 1, use_dropout=False),
                       in_shardings=(run.shardings, shardings), out_shardings=(run.shardings, None))
        local = {k: v[0] for k, v in run.data.train.next_chunk(1).items()}
        batch = global_batch(local, shardings, 0, config.train.batch_size)
        new_state, metrics = step(state, batch)
    return state, new_state, jax.device_get(metrics)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "text.txt"
    rng = np.random.default_rng(0)
    path.write_text("".join(rng.choice(list("abcdefghij klmnop\n"), size=5000)))
    return path


# The step tests train the model with biases (use_bias=True) so that one 8-device step serves two tests: the
# data_fsdp_tensor step is compared with the 1-device step and its shardings are checked against the rules
# (test_parameters_are_sharded_by_the_rules reads bias shardings). The key bias, whose gradient is exactly zero in
# theory, is left out of the parameter comparison (see _config), as in the encoder test below.
STEP_MESHES = ("data", "fsdp", "data_fsdp_tensor")  # presets of configs/meshes.py: data=8, fsdp=8, 2 x 2 x 2


@pytest.fixture(scope="module")
def reference(text_file, tmp_path_factory):
    _, state, metrics = _one_step(_config(text_file, use_bias=True), tmp_path_factory.mktemp("ref"),
                                  jax.devices()[:1])
    return jax.device_get(state.params), metrics


@pytest.fixture(scope="module")
def sharded_step(text_file, tmp_path_factory):
    """name of STEP_MESHES -> (state, metrics) of one train step on 8 devices, computed once per mesh."""
    steps = {}

    def step(name: str):
        if name not in steps:
            steps[name] = _one_step(apply_mesh(_config(text_file, use_bias=True), name),
                                    tmp_path_factory.mktemp(name), jax.devices())[1:]
        return steps[name]

    return step


@pytest.mark.parametrize("mesh", STEP_MESHES)
def test_sharded_step_matches_single_device(mesh, reference, sharded_step):
    ref_params, ref_metrics = reference
    state, metrics = sharded_step(mesh)
    np.testing.assert_allclose(metrics["train/loss"], ref_metrics["train/loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics["train/grad_norm"], ref_metrics["train/grad_norm"], rtol=1e-5)
    flat_ref = jax.tree_util.tree_leaves_with_path(ref_params)
    flat_new = dict(jax.tree_util.tree_leaves_with_path(jax.device_get(state.params)))
    compared = 0
    for path, value in flat_ref:
        if jax.tree_util.keystr(path).endswith("['key']['bias']"):
            continue  # an exactly-zero gradient in theory: Adam amplifies its rounding noise (see _config)
        # Relative error of each tensor: Adam's first update is lr * g / (|g| + eps), so single elements with
        # gradients near eps amplify reduction-order rounding; the tensor as a whole must agree to 1e-5.
        error = np.linalg.norm(flat_new[path] - value) / max(np.linalg.norm(value), 1e-12)
        assert error < 1e-5, f"{jax.tree_util.keystr(path)}: relative error {error:.2e}"
        compared += 1
    assert compared == len(flat_ref) - 2, "every parameter but the two layers' key biases is compared"


def _encoder_config(text_path, tfds_dir, **mesh):
    """A tiny BERT (MLM + NSP, token types, pooler) on the grain pipeline: [batch] label arrays and [batch, P]
    prediction positions shard beside [batch, seq] tokens."""
    config = config_lib.default_config()
    config.model.update(**BERT_ARCHITECTURE)
    config.model.update(num_layers=2, num_heads=4, d_model=32, d_ff=64, max_len=24)
    config.data.update(path=str(text_path), split_by="line", objective="masked_lm", tokenizer="sentencepiece",
                       tokenizer_vocab_size=320, seq_len=24, tfds_data_dir=str(tfds_dir))
    config.train.update(batch_size=8, steps=10)
    config.optimizer.update(warmup_steps=0)
    config.mesh.update(data=1, fsdp=1, tensor=1)
    config.mesh.update(**mesh)
    return config


def _encoder_decoder_config(text_path, tfds_dir, **mesh):
    """A tiny T5 (relative buckets, shared embedding, cross-attention) on span-corruption rows, which carry
    encoder and decoder keys of different lengths."""
    config = _encoder_config(text_path, tfds_dir, **mesh)
    config.model.update(**ENCODER_DECODER_STYLES.get("t5"))
    config.model.update(num_decoder_layers=3, max_len=32)
    config.data.update(objective="span_corruption", seq_len=32, num_sentinels=8)
    return config


@pytest.mark.parametrize("make_config", [_encoder_config, _encoder_decoder_config], ids=["encoder",
                                                                                          "encoder_decoder"])
def test_sharded_encoder_step_matches_single_device(tmp_path, make_config):
    """The 1-device step starts from the state the 8-device run initialised on its shards (gathered), which
    spares a second compile of the initialisation; that init_state gives the 1-device values on every mesh is
    checked by test_sharded_step_matches_single_device (the same function and initialisers)."""
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta", "iota", "kappa"]
    lines = [". ".join(" ".join(rng.choice(words, size=5)) for _ in range(3)) + "." for _ in range(300)]
    text_path = tmp_path / "sentences.txt"
    text_path.write_text("\n".join(lines))
    workdir = tmp_path / "run"  # one work directory: both runs use the tokenizer the first one trained
    start, state, metrics = _one_step(make_config(text_path, tmp_path, data=2, fsdp=2, tensor=2), workdir,
                                      jax.devices())
    _, reference, ref_metrics = _one_step(make_config(text_path, tmp_path), workdir, jax.devices()[:1],
                                          start=jax.device_get(start))
    np.testing.assert_allclose(metrics["train/loss"], ref_metrics["train/loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics["train/grad_norm"], ref_metrics["train/grad_norm"], rtol=1e-5)
    assert state.params["token_embedding"]["embedding"].sharding.spec == P("tensor", "fsdp")
    new_params = dict(jax.tree_util.tree_leaves_with_path(jax.device_get(state.params)))
    for path, value in jax.tree_util.tree_leaves_with_path(jax.device_get(reference.params)):
        if jax.tree_util.keystr(path).endswith("['key']['bias']"):
            continue  # an exactly-zero gradient in theory: Adam amplifies its rounding noise (see _config)
        new = new_params[path]
        error = np.linalg.norm(new - value) / max(np.linalg.norm(value), 1e-12)
        assert error < 1e-5, f"{jax.tree_util.keystr(path)}: relative error {error:.2e}"


def test_parameters_are_sharded_by_the_rules(sharded_step):
    state, _ = sharded_step("data_fsdp_tensor")  # the step test_sharded_step_matches_single_device checks
    params = state.params
    expect = {
        ("token_embedding", "embedding"): P("tensor", "fsdp"),
        ("block_0", "attention", "query", "kernel"): P("fsdp", "tensor", None),
        ("block_0", "attention", "key", "kernel"): P("fsdp", "tensor", None),
        ("block_0", "attention", "out", "kernel"): P("tensor", None, "fsdp"),
        ("block_0", "mlp", "up", "kernel"): P("fsdp", "tensor"),
        ("block_0", "mlp", "down", "kernel"): P("tensor", "fsdp"),
        ("block_0", "mlp", "up", "bias"): P("tensor"),
        ("output_head", "dense", "kernel"): P("fsdp", "tensor"),
        ("final_norm", "scale"): P(None),
    }
    for path, spec in expect.items():
        leaf = params
        for key in path:
            leaf = leaf[key]
        assert leaf.sharding.spec == spec, f"{'/'.join(path)}: {leaf.sharding.spec} != {spec}"
    up = params["block_0"]["mlp"]["up"]["kernel"]
    assert up.addressable_shards[0].data.shape == (16, 64), "a (32, 128) kernel splits 2 x 2 over fsdp x tensor"
    assert state.opt_state[1][0].mu["block_0"]["mlp"]["up"]["kernel"].sharding.spec == P("fsdp", "tensor")


def _padded(vocab, rules=None, pad_multiple=128, padded_vocab_size=None, **mesh):
    """The padded vocabulary build_run gives a `mesh` (unnamed axes 1) under `rules` (default: the config's)."""
    config = config_lib.default_config()
    config.model.vocab_pad_multiple = pad_multiple
    if rules is not None:
        config.mesh.logical_axis_rules = rules
    sizes = {"data": 1, "fsdp": 1, "tensor": 1, **mesh}
    shards = vocab_shard_sizes(sizes, logical_rules(config.mesh))
    return build_model_config(config.model, vocab, shards, padded_vocab_size=padded_vocab_size).padded_vocab_size


@pytest.mark.parametrize("mesh", [{"data": 3}, {"fsdp": 3}, {"data": 6}, {"data": 5}, {"data": 2, "fsdp": 7}])
def test_default_rules_pad_the_vocabulary_only_for_the_tensor_axis(mesh):
    # The old rule (every mesh axis) gave 50560 for data=5 and 51072 for fsdp=7.
    assert _padded(50257, **mesh) == 50304
    assert _padded(65, **mesh) == 128  # the old rule: 384 for data=3


def test_the_tensor_axis_pads_the_vocabulary():
    assert _padded(65, tensor=3) == 384
    assert _padded(50257, tensor=3) % 384 == 0
    assert _padded(50257, tensor=5) == 50560


def test_custom_rules_pad_for_every_mesh_axis_the_vocabulary_maps_to():
    rules = [(name, axes) for name, axes in config_lib.DEFAULT_LOGICAL_AXIS_RULES if name != "vocab"]
    rules.append(("vocab", ("tensor", "fsdp")))
    assert _padded(65, rules, tensor=2, fsdp=3) == 384
    assert _padded(65, rules, pad_multiple=1, tensor=2, fsdp=2) == 68, "the product of the axes, not their lcm"
    # act_vocab (the logits) counts beside vocab (the parameters); a rule to None shards nothing.
    assert mesh_axes_of((("vocab", "tensor"), ("act_vocab", "data"), ("vocab", None)), ("vocab", "act_vocab")) \
        == ("tensor", "data")


def test_a_saved_padded_vocabulary_is_kept_on_a_mesh_that_divides_it():
    assert _padded(50257, padded_vocab_size=50560, data=8) == 50560
    assert _padded(50257, padded_vocab_size=50304, tensor=2) == 50304


def test_a_saved_padded_vocabulary_the_tensor_axis_does_not_divide_is_a_config_error():
    with pytest.raises(ConfigError, match=r"padded vocabulary size 50304 .*mesh\.tensor=5"):
        _padded(50257, padded_vocab_size=50304, tensor=5)
    with pytest.raises(ConfigError, match="padded vocabulary size 50176 .*smaller than the 50257-id vocabulary"):
        _padded(50257, padded_vocab_size=50176)


def test_build_run_uses_the_given_padded_vocabulary(text_file, tmp_path):
    run = build_run(_config(text_file, data=8), str(tmp_path), devices=jax.devices(), padded_vocab_size=384)
    assert run.model_config.padded_vocab_size == 384
    assert run.abstract_state.params["token_embedding"]["embedding"].shape == (384, 32)
