"""Test-suite setup: 8 forced CPU devices (before JAX is imported), a private TFDS data directory and access
to ../shared/data."""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import atexit  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import pathlib  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

import pytest  # noqa: E402

# Datasets the tests prepare go to a fresh directory (inherited by CLI subprocesses), never ~/tensorflow_datasets.
os.environ["TFDS_DATA_DIR"] = tempfile.mkdtemp(prefix="llm_jax_tfds_")
atexit.register(shutil.rmtree, os.environ["TFDS_DATA_DIR"], ignore_errors=True)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def shared_data_file(name: str) -> pathlib.Path:
    """A file of ../shared/data; missing data fails under CI=true and skips (with the reason) elsewhere."""
    path = SHARED_DATA / name
    if not path.exists():
        message = f"{path} is missing: the tests read the project's shared data from ../shared/data"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def subprocess_env() -> dict[str, str]:
    """Environment for CLI subprocesses: one CPU device, the repo importable."""
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["JAX_PLATFORMS"] = "cpu"
    return env


def run_module(module: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m module args` from the repository root, as a user would run it."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO_ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)


def metrics(workdir) -> list[dict]:
    """The records of DIR/metrics.jsonl."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def final(records: list[dict], key: str) -> float:
    """The last logged value of a metric."""
    return [r[key] for r in records if key in r][-1]


def run_updates(tx, params, grads_list):
    """The parameters after one jitted optimizer update per gradient tree of `grads_list`."""
    import jax
    import optax

    @jax.jit
    def run(params, grads_list):
        state = tx.init(params)
        for grads in grads_list:
            updates, state = tx.update(grads, state, params)
            params = optax.apply_updates(params, updates)
        return params

    return run(params, grads_list)
