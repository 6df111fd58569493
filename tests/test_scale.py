"""Scale-out on 8 forced CPU devices: FSDP really shards, and a checkpoint restores onto another mesh."""

from __future__ import annotations

import json
import shutil

import jax
import pytest

from llm_jax import config as config_lib
from llm_jax.training import aot
from llm_jax.training.loop import train

pytestmark = pytest.mark.skipif(jax.device_count() != 8, reason="needs exactly 8 devices (XLA_FLAGS from conftest)")


def _config(**mesh):
    config = config_lib.default_config()
    config.model.update(num_layers=2, num_heads=4, d_model=64, max_len=32)
    config.data.update(source="python_docs", seq_len=32)
    config.train.update(steps=20, batch_size=16, log_every=1, eval_every=10, eval_steps=2, checkpoint_every=10,
                        steps_per_dispatch=5)
    config.optimizer.update(warmup_steps=2)
    config.mesh.update(data=1, fsdp=1, tensor=1)
    config.mesh.update(**mesh)
    return config


def test_fsdp_shards_parameters_and_optimizer_state(tmp_path):
    replicated = aot.compile_report(_config(data=8), str(tmp_path / "data"))
    fsdp = aot.compile_report(_config(fsdp=8), str(tmp_path / "fsdp"))
    state_bytes = {name: r["params_bytes_per_device"] + r["optimizer_bytes_per_device"]
                   for name, r in (("data", replicated), ("fsdp", fsdp))}
    assert state_bytes["fsdp"] <= state_bytes["data"] / 6, state_bytes
    assert fsdp["argument_bytes"] <= replicated["argument_bytes"] / 4, "the compiled step's inputs shrink too"


def _losses(workdir) -> dict[int, float]:
    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def test_checkpoint_restores_onto_a_different_mesh_and_training_continues(tmp_path):
    original = tmp_path / "fsdp8"
    train(_config(fsdp=8), str(original))
    resharded = tmp_path / "data2_fsdp2_tensor2"
    (resharded / "checkpoints").mkdir(parents=True)
    shutil.copytree(original / "checkpoints" / "10", resharded / "checkpoints" / "10")
    shutil.copytree(original / "tokenizer", resharded / "tokenizer")
    train(_config(data=2, fsdp=2, tensor=2), str(resharded))
    before, after = _losses(original), _losses(resharded)
    assert sorted(after) == list(range(11, 21)), "the resharded run resumes at step 10"
    for step in range(11, 21):
        assert after[step] == pytest.approx(before[step], rel=1e-5), step


def test_indivisible_parameter_sharding_is_named_before_compiling(tmp_path):
    from llm_jax.training.run import build_run

    config = _config(tensor=8)
    config.model.update(num_heads=6, d_model=48)
    with pytest.raises(config_lib.ConfigError, match=r"'(kv_)?heads' dimension \(6\) is split over mesh axes \('tensor',\)"):
        build_run(config, str(tmp_path))
