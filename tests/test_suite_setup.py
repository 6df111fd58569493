"""The suite itself: a user's own XLA_FLAGS cannot make the 8-device tests vanish, the CPU backend is pinned,
and a missing requirement fails under CI=true instead of skipping."""

from __future__ import annotations

import os
import subprocess
import sys

import jax

from conftest import REPO_ROOT, subprocess_env


def test_the_suite_runs_on_8_cpu_devices():
    assert os.environ["JAX_PLATFORMS"] == "cpu" and jax.default_backend() == "cpu"
    assert jax.device_count() == 8


def test_own_xla_flags_keep_the_8_device_tests_and_ci_fails_a_missing_requirement(tmp_path):
    """pytest in a subprocess with the user's XLA_FLAGS (one device count among them) and CI=true: the 8-device
    checkpoint test runs and passes, and a test whose requirement is missing fails instead of skipping."""
    probe = REPO_ROOT / "tests" / f"test_zz_probe_{os.getpid()}.py"
    probe.write_text("from conftest import needs\n\ndef test_missing():\n    needs(False, 'a missing requirement')\n")
    env = {**subprocess_env(), "CI": "true",
           "XLA_FLAGS": "--xla_cpu_enable_fast_math=false --xla_force_host_platform_device_count=2"}
    try:
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider",
                                 "tests/test_checkpoint.py::test_missing_checkpoint_raises", str(probe)],
                                cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    finally:
        probe.unlink()
    summary = result.stdout.strip().splitlines()[-1]
    assert "1 failed, 1 passed" in summary and "skipped" not in summary, result.stdout[-2000:]
    assert "CI=true and a missing requirement" in result.stdout
