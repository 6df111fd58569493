"""What produced a run: package versions, git commit, devices and mesh (written into DIR/config.json)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from typing import Any

import jax

from llm_jax import host_cpu

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "ml-collections", "numpy",
            "tensorflow-datasets", "sentencepiece", "grain")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    """The commit of the llm_jax checkout (with '-dirty' for local changes), or None outside git."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def provenance(mesh_shape: dict[str, int], peak_flops: dict[str, Any] | None = None) -> dict[str, Any]:
    """Where and with what a run started; `peak_flops` (training only): the peak train/mfu divides by, its
    source (configured, table or calibrated) and dtype (llm_jax.training.peak_flops.Peak)."""
    devices = jax.devices()
    where = {
        "packages": {name: _version(name) for name in PACKAGES},
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "git_commit": git_commit(),
        "command": sys.argv,
        "devices": {"platform": devices[0].platform, "kind": devices[0].device_kind, "count": len(devices),
                    "process_count": jax.process_count()},
        "mesh": mesh_shape,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),  # llm_jax's CPU defaults and mesh.cpu_devices included
        "cpu": host_cpu.describe(),
    }
    if peak_flops is not None:
        where["peak_flops"] = peak_flops
    return where
