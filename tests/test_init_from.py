"""train.init_from: reading another work directory's latest parameters and merging them into a new model."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llm_jax import config as config_lib
from llm_jax.errors import ConfigError
from llm_jax.models.model_config import build_model_config, model_config_to_json
from llm_jax.training.checkpoint import Checkpointer
from llm_jax.training.init_from import init_params_from, merge_params, read_source_params
from llm_jax.training.state import TrainState

D = 8


def _dense(rng, n_in, n_out):
    return {"kernel": rng.normal(size=(n_in, n_out)).astype(np.float32),
            "bias": rng.normal(size=n_out).astype(np.float32)}


def _encoder_params(seed, vocab_rows=32, heads=("mlm_head", "nsp_head")):
    """An encoder-like tree: embeddings, two blocks, and the given heads."""
    rng = np.random.default_rng(seed)
    block = lambda: {"attention": {"query": _dense(rng, D, D), "out": _dense(rng, D, D)},  # noqa: E731
                     "mlp": {"up": _dense(rng, D, 2 * D), "down": _dense(rng, 2 * D, D)}}
    params = {"token_embedding": {"embedding": rng.normal(size=(vocab_rows, D)).astype(np.float32)},
              "block_0": block(), "block_1": block(),
              "final_norm": {"scale": np.ones(D, np.float32)}}
    output_bias = rng.normal(size=vocab_rows).astype(np.float32)
    all_heads = {"mlm_head": {"transform": _dense(rng, D, D), "output_bias": output_bias},
                 "nsp_head": _dense(rng, D, 2), "classifier": _dense(rng, D, 3)}
    return {**params, **{name: all_heads[name] for name in heads}}


def _model_config(family="encoder", vocab=20):
    config = config_lib.default_config()
    config.model.update(num_layers=2, num_heads=2, d_model=D, max_len=16)
    return build_model_config(config.model, vocab, {"data": 1, "fsdp": 1, "tensor": 1}).replace(family=family)


def _write_source(workdir, params_by_step, model_config=None):
    """A work directory as llm_jax.train leaves it: config.json and checkpoints/STEP/{state,data}."""
    os.makedirs(workdir, exist_ok=True)
    payload = {"config": {}, "model_config": model_config_to_json(model_config or _model_config())}
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(payload, f)
    tx = optax.adamw(1e-3)
    with Checkpointer(os.path.join(workdir, "checkpoints"), keep=3, async_save=False) as checkpointer:
        for step, params in params_by_step.items():
            state = TrainState(step=jnp.asarray(step, jnp.int32), params=jax.tree.map(jnp.asarray, params),
                               opt_state=tx.init(params), rng=jax.random.key_data(jax.random.key(0)))
            checkpointer.save(step, state, {"step": step})


def _flat(tree):
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def _assert_equal_trees(a, b):
    flat_a, flat_b = _flat(a), _flat(b)
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        assert flat_a[key].dtype == flat_b[key].dtype, key
        np.testing.assert_array_equal(flat_a[key], flat_b[key], err_msg=key)


def test_read_source_params_returns_the_latest_checkpoints_params(tmp_path):
    workdir = str(tmp_path / "source")
    _write_source(workdir, {2: _encoder_params(1), 5: _encoder_params(2)})
    params, model_config = read_source_params(workdir)
    assert all(isinstance(leaf, np.ndarray) for leaf in jax.tree.leaves(params))
    _assert_equal_trees(params, _encoder_params(2))
    assert model_config["family"] == "encoder" and model_config["vocab_size"] == 20


def test_read_source_params_from_a_relative_path(tmp_path, monkeypatch):
    """train.init_from=runs/minilm, as the README writes it: Orbax reads no item metadata through a relative path."""
    _write_source(str(tmp_path / "runs" / "source"), {3: _encoder_params(4)})
    monkeypatch.chdir(tmp_path)
    params, _ = read_source_params(os.path.join("runs", "source"))
    _assert_equal_trees(params, _encoder_params(4))


def test_read_source_params_errors_name_the_key_and_the_path(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=f"train.init_from={missing} is not a directory"):
        read_source_params(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=f"train.init_from={empty} has no config.json"):
        read_source_params(str(empty))
    (empty / "config.json").write_text(json.dumps({"model_config": model_config_to_json(_model_config())}))
    with pytest.raises(ConfigError, match=f"train.init_from={empty} has no checkpoint"):
        read_source_params(str(empty))
    (empty / "checkpoints" / "3" / "state").mkdir(parents=True)
    (empty / "checkpoints" / "3" / "state" / "junk").write_text("not a checkpoint")
    with pytest.raises(ConfigError, match=f"train.init_from={empty}: cannot read the checkpoint .*3/state"):
        read_source_params(str(empty))


def test_merge_copies_shared_keeps_new_heads_and_reports_dropped():
    source = _encoder_params(1, heads=("mlm_head", "nsp_head"))
    target = jax.tree.map(jnp.asarray, _encoder_params(7, heads=("classifier",)))
    target["block_0"]["mlp"]["up"]["kernel"] = target["block_0"]["mlp"]["up"]["kernel"].astype(jnp.bfloat16)
    merged, report = merge_params(target, source, target_family="encoder", source_family="encoder")
    assert set(report["new"]) == {"classifier/kernel", "classifier/bias"}
    assert set(report["dropped"]) == {"mlm_head/transform/kernel", "mlm_head/transform/bias", "mlm_head/output_bias",
                                      "nsp_head/kernel", "nsp_head/bias"}
    assert "block_1/attention/query/kernel" in report["loaded"] and len(report["loaded"]) == 18
    np.testing.assert_array_equal(merged["classifier"]["kernel"], target["classifier"]["kernel"])
    np.testing.assert_array_equal(merged["token_embedding"]["embedding"], source["token_embedding"]["embedding"])
    up = merged["block_0"]["mlp"]["up"]["kernel"]
    assert up.dtype == jnp.bfloat16  # cast to the target's dtype
    np.testing.assert_array_equal(up, source["block_0"]["mlp"]["up"]["kernel"].astype(jnp.bfloat16))
    assert jax.tree.structure(merged) == jax.tree.structure(target)


def test_merge_rejects_another_family():
    with pytest.raises(ConfigError, match="train.init_from=/runs/gpt holds a model of family 'decoder'; this run's model.family is 'encoder'"):
        merge_params(_encoder_params(1), _encoder_params(2), target_family="encoder", source_family="decoder",
                     source_dir="/runs/gpt")


def test_merge_rejects_a_shape_mismatch_naming_the_path():
    target = _encoder_params(1)
    target["block_1"]["mlp"]["up"]["kernel"] = np.zeros((D, 3 * D), np.float32)
    with pytest.raises(ConfigError, match=r"parameter block_1/mlp/up/kernel has shape \(8, 16\) there and \(8, 24\)"):
        merge_params(target, _encoder_params(2), target_family="encoder", source_family="encoder")


def test_merge_rejects_nothing_shared():
    with pytest.raises(ConfigError, match="shares no parameter with this model"):
        merge_params({"other": {"w": np.zeros(3)}}, _encoder_params(2), target_family="encoder",
                     source_family="encoder")


@pytest.mark.parametrize("target_rows", [24, 40])
def test_merge_copies_the_common_vocabulary_rows_when_padding_differs(target_rows):
    source = _encoder_params(1, vocab_rows=32)
    target = _encoder_params(2, vocab_rows=target_rows)
    merged, report = merge_params(target, source, target_family="encoder", source_family="encoder",
                                  source_vocab_size=20, target_vocab_size=20)
    assert set(report["resized"]) == {"token_embedding/embedding", "mlm_head/output_bias"}
    assert set(report["resized"]) <= set(report["loaded"])
    common = min(32, target_rows)
    for merged_leaf, source_leaf, target_leaf in [
            (merged["token_embedding"]["embedding"], source["token_embedding"]["embedding"],
             target["token_embedding"]["embedding"]),
            (merged["mlm_head"]["output_bias"], source["mlm_head"]["output_bias"], target["mlm_head"]["output_bias"])]:
        assert merged_leaf.shape == target_leaf.shape
        np.testing.assert_array_equal(merged_leaf[:common], source_leaf[:common])
        np.testing.assert_array_equal(merged_leaf[common:], target_leaf[common:])
    with pytest.raises(ConfigError, match="mlm_head/output_bias holds 20 tokens there and 30 in this run"):
        merge_params(target, source, target_family="encoder", source_family="encoder",
                     source_vocab_size=20, target_vocab_size=30)


def test_init_params_from_reads_and_merges(tmp_path):
    workdir = str(tmp_path / "pretrained")
    _write_source(workdir, {4: _encoder_params(3)})
    target = _encoder_params(9, heads=("classifier",))
    merged, report = init_params_from(workdir, target, _model_config())
    np.testing.assert_array_equal(merged["block_1"]["mlp"]["down"]["kernel"],
                                  _encoder_params(3)["block_1"]["mlp"]["down"]["kernel"])
    assert "nsp_head/kernel" in report["dropped"] and "classifier/kernel" in report["new"]
    with pytest.raises(ConfigError, match="holds a model of family 'encoder'; this run's model.family is 'decoder'"):
        init_params_from(workdir, target, _model_config(family="decoder"))
