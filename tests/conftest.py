"""Test-suite setup: 8 forced CPU devices (before JAX is imported), a private TFDS data directory and access
to ../shared/data."""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import atexit  # noqa: E402
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
