"""Checkpoints under faults: a SIGKILL at several moments of a save leaves the previous step loadable (and the
next resume says which step), and a full disk during a save ends with one line naming the step."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from conftest import REPO_ROOT, subprocess_env
from llm_jax.errors import CheckpointError
from llm_jax.training.checkpoint import Checkpointer, committed_steps

# Saves step 1, says so, then saves step 2 of a state large enough (64 MB) that the write takes a while.
SAVER = textwrap.dedent("""
    import sys
    import jax.numpy as jnp
    from llm_jax.training.checkpoint import Checkpointer

    checkpointer = Checkpointer(sys.argv[1], keep=3)
    for step in (1, 2):
        state = {"w": jnp.full((4096, 4096), float(step)), "step": jnp.array(step)}
        checkpointer.save(step, state, {"position": step}, force=True)
        if step == 1:
            checkpointer.wait()
            print("saved 1", flush=True)
    checkpointer.wait()
    print("saved 2", flush=True)
""")


def _abstract():
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return {"w": jax.ShapeDtypeStruct((4096, 4096), np.float32, sharding=device),
            "step": jax.ShapeDtypeStruct((), np.int32, sharding=device)}


def _kill_while_saving(directory: str, delay: float) -> bool:
    """Runs SAVER and SIGKILLs it `delay` seconds after step 2's temporary directory appears; whether it died
    before finishing."""
    saver = subprocess.Popen([sys.executable, "-c", SAVER, directory], cwd=REPO_ROOT, env=subprocess_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert saver.stdout.readline() == "saved 1\n"
    deadline = time.monotonic() + 60
    while not any(name.startswith("2.") for name in os.listdir(directory)) and saver.poll() is None:
        assert time.monotonic() < deadline, "step 2's save never started"
        time.sleep(0.001)
    time.sleep(delay)
    saver.send_signal(signal.SIGKILL)
    output = saver.communicate(timeout=30)[0]
    return "saved 2" not in output


@pytest.mark.parametrize("delay", [0.0, 0.3, 2.0])
def test_sigkill_during_a_save_leaves_the_previous_step_loadable(delay, tmp_path):
    directory = str(tmp_path / "checkpoints")
    died_mid_save = _kill_while_saving(directory, delay)
    checkpointer = Checkpointer(directory, keep=3)
    try:
        step, state, data_state = checkpointer.restore_newest(_abstract(), fallback=False)
    finally:
        checkpointer.close()
    assert committed_steps(directory)[-1] == step
    assert data_state == {"position": step} and int(state["step"]) == step
    assert np.all(np.asarray(state["w"]) == float(step)), "the restored step is whole"
    if died_mid_save:
        assert step == 1, "an unfinished step 2 is never listed"
    if delay == 0.0:
        assert died_mid_save, "killed as step 2's write began"


def test_a_full_disk_during_a_save_names_the_step_and_the_last_complete_one(tmp_path, monkeypatch):
    """ENOSPC injected into the write path (a real full disk is in the fault-injection benchmark)."""
    directory = str(tmp_path / "checkpoints")
    state = {"w": jax.numpy.ones((8,)), "step": jax.numpy.array(1)}
    with Checkpointer(directory, keep=3, async_save=False) as checkpointer:
        checkpointer.save(1, state, {"position": 1}, force=True)
        from llm_jax.training import checkpoint as checkpoint_module

        def full_disk(self, directory, args):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(checkpoint_module.ProcessJsonHandler, "save", full_disk)
        with pytest.raises(CheckpointError, match=r"writing checkpoint step 2 under .* failed: OSError: "
                                                  r".*No space left on device.*the newest complete checkpoint is step 1"):
            checkpointer.save(2, state, {"position": 2}, force=True)
    assert committed_steps(directory) == [1]
