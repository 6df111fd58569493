"""Test-suite setup: 8 forced CPU devices (before JAX is imported), the CPU backend pinned, a private TFDS data
directory and access to ../shared/data.

The device count is appended to a user's own XLA_FLAGS (replacing any count there), so the 8-device tests
never vanish; JAX_PLATFORMS=cpu keeps a machine's GPU out of the suite unless `--gpu` is given (then only the
tests marked `gpu` see it, and they run only when asked). A missing requirement fails under CI=true instead of
skipping (`needs`, `shared_data_file`, `import_or_fail`).
"""

from __future__ import annotations

import os
import re
import sys

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
os.environ["XLA_FLAGS"] = " ".join([*re.sub(rf"{DEVICE_COUNT_FLAG}=\S*", "", os.environ.get("XLA_FLAGS", "")).split(),
                                    f"{DEVICE_COUNT_FLAG}=8"])
# pytest-xdist workers (tests/pytest.ini runs two) see their own argv: the controller passes --gpu on by env
GPU_ASKED = "--gpu" in sys.argv or os.environ.get("LLM_JAX_TESTS_GPU") == "1"
if GPU_ASKED:
    os.environ["LLM_JAX_TESTS_GPU"] = "1"
else:
    os.environ["JAX_PLATFORMS"] = "cpu"

import atexit  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import pathlib  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

import pytest  # noqa: E402

# Datasets the tests prepare go to a fresh directory (inherited by CLI subprocesses), never ~/tensorflow_datasets.
os.environ["TFDS_DATA_DIR"] = tempfile.mkdtemp(prefix="llm_jax_tfds_")
atexit.register(shutil.rmtree, os.environ["TFDS_DATA_DIR"], ignore_errors=True)
# Training runs measure no CPU peak for train/mfu (a ~1 s matmul per process); tests/test_flops.py turns it on.
os.environ["LLM_JAX_CALIBRATE_PEAK"] = "0"

# CLI subprocesses share a JAX persistent compilation cache for this session: the many runs of the same quick
# configs compile each program once. Not the test process itself, whose tests inspect what a compile prints.
SUBPROCESS_COMPILE_CACHE = tempfile.mkdtemp(prefix="llm_jax_jax_cache_")
atexit.register(shutil.rmtree, SUBPROCESS_COMPILE_CACHE, ignore_errors=True)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def pytest_addoption(parser) -> None:
    parser.addoption("--gpu", action="store_true", help="run the tests marked gpu on the machine's accelerator")
    parser.addoption("--slow", action="store_true", help="also run the tests marked slow (the default suite stays "
                                                         "under 15 minutes on 2 cores)")


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "gpu: needs an accelerator; runs only with --gpu (the suite pins CPU)")
    config.addinivalue_line("markers", "slow: long equivalence or end-to-end checks; run with --slow")


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if "gpu" in item.keywords and not config.getoption("--gpu"):
            item.add_marker(pytest.mark.skip(reason="a GPU test: run with --gpu on a machine with one"))
        if "slow" in item.keywords and not config.getoption("--slow"):
            item.add_marker(pytest.mark.skip(reason="a slow test: run with --slow"))


def needs(condition: bool, reason: str) -> None:
    """Stops the current test (or module, at import) when `condition` is false: a failure under CI=true, where
    every requirement must hold, and a skip with the reason elsewhere."""
    if condition:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def import_or_fail(module: str):
    """The module, which the test extra installs (pip install -e '.[test]'); missing: see `needs`."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        needs(False, f"{module} is not importable ({error}): install the test extra, pip install -e '.[test]'")


def shared_data_file(name: str) -> pathlib.Path:
    """A file of ../shared/data; missing data fails under CI=true and skips (with the reason) elsewhere."""
    path = SHARED_DATA / name
    needs(path.exists(), f"{path} is missing: the tests read the project's shared data from ../shared/data")
    return path


def subprocess_env() -> dict[str, str]:
    """Environment for CLI subprocesses: one CPU device, the repo importable, the session's compilation cache."""
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["JAX_PLATFORMS"] = "cpu"
    env.setdefault("JAX_COMPILATION_CACHE_DIR", SUBPROCESS_COMPILE_CACHE)
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
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


def window_config(seq_len: int, batch_size: int, steps: int):
    """The `test`-size decoder on random windows of seq_len tokens, one device: the train-step tests' config."""
    from configs.model_sizes import apply_model_size
    from llm_jax import config as config_lib

    config = config_lib.default_config()
    apply_model_size(config, "test")
    config.model.update(max_len=seq_len)
    config.data.update(seq_len=seq_len, pipeline="windows")
    config.train.update(batch_size=batch_size, steps=steps)
    config.mesh.update(data=1, fsdp=1, tensor=1)
    return config


def random_text_run(tmp_path_factory, config):
    """A one-device run of `config` (its data.path is set here) on 5,000 random characters: the tiny corpus
    of the train-step tests."""
    from llm_jax.training.run import build_run
    import jax
    import numpy as np

    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text("".join(np.random.default_rng(0).choice(list("abcdefghij klmnop\n"), size=5000)))
    config.data.path = str(path)
    return build_run(config, str(tmp_path_factory.mktemp("run")), devices=jax.devices()[:1])
