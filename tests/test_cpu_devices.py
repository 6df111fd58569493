"""mesh.cpu_devices: the CPU split into per-core XLA devices trains the same model, data-parallel."""

from __future__ import annotations

import json
import os

import pytest

from conftest import final, metrics, run_module, shared_data_file
from llm_jax import config as config_lib
from llm_jax import xla_defaults


@pytest.mark.parametrize("requested, batch, accum, cores, expected", [
    (-1, 12, 1, 2, 2),   # one device per core
    (-1, 12, 1, 8, 6),   # the most that split the batch evenly
    (-1, 12, 4, 8, 3),   # each shard holds whole micro-batches of train.grad_accum_steps
    (-1, 7, 1, 4, 1),    # a prime batch: one device
    (3, 12, 1, 2, 3),    # an explicit count is taken as given (the mesh check then applies)
    (0, 12, 1, 8, 1),
])
def test_device_count(requested, batch, accum, cores, expected):
    assert xla_defaults.cpu_device_count(requested, batch, accum, cores=cores) == expected


def test_split_cpu_sets_the_flag_once_and_leaves_a_users_count_alone(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
    assert xla_defaults.split_cpu(2, 12, 1) == 2
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_enable_fast_math=false --xla_force_host_platform_device_count=2"
    assert xla_defaults.split_cpu(2, 12, 1) is None  # already set (by us, launch.local or the user): kept
    monkeypatch.setenv("XLA_FLAGS", "")
    assert xla_defaults.split_cpu(0, 12, 1) is None and os.environ["XLA_FLAGS"] == ""


def test_bad_value_is_a_config_error():
    config = config_lib.default_config()
    config.mesh.cpu_devices = -2
    with pytest.raises(config_lib.ConfigError, match="mesh.cpu_devices=-2"):
        config_lib.validate(config, 1)


def test_two_cpu_devices_train_the_same_model(tmp_path):
    """The quick shakespeare run on 2 CPU devices (data=2) logs the losses of the 1-device run."""
    shared_data_file("tinyshakespeare.txt")
    losses = {}
    for count in (0, 2):
        workdir = tmp_path / f"cpu_devices_{count}"
        result = run_module("llm_jax.train", "--config=experiments/shakespeare_char.py:quick", f"--workdir={workdir}",
                            f"--config.mesh.cpu_devices={count}")
        assert result.returncode == 0, result.stderr[-3000:]
        where = json.loads((workdir / "config.json").read_text())["provenance"]
        assert where["devices"]["count"] == max(count, 1) and where["mesh"]["data"] == max(count, 1)
        losses[count] = [r["train/loss"] for r in metrics(workdir) if "train/loss" in r]
        assert final(metrics(workdir), "eval/loss") > 0
    assert len(losses[0]) == len(losses[2]) >= 3
    for one, two in zip(losses[0], losses[2]):
        assert one == pytest.approx(two, abs=2e-4)
