"""XLA flags llm_jax sets by default, before JAX starts its backend (XLA_FLAGS is read once, at start-up).

On CPU, jaxlib 0.10 sends dots *and* the elementwise work around them into YNNPACK fusions; limiting
YNNPACK to the dots made the shakespeare_char train step 1.4-1.5x faster on a 2-core machine
(benchmarks/shakespeare_char_throughput.py). The flag is CPU-only, so GPU and TPU runs ignore it. It is
only added for jaxlib versions known to accept it (an unknown flag aborts XLA), and never when the user's
XLA_FLAGS already set it.
"""

from __future__ import annotations

import importlib.metadata
import os

CPU_FLAGS = {"--xla_cpu_experimental_ynn_fusion_type": "dot"}
VERIFIED_JAXLIB_MINOR = ((0, 10),)


def _jaxlib_minor() -> tuple[int, int] | None:
    try:
        major, minor = importlib.metadata.version("jaxlib").split(".")[:2]
        return int(major), int(minor)
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None


def apply() -> None:
    if _jaxlib_minor() not in VERIFIED_JAXLIB_MINOR:
        return
    flags = os.environ.get("XLA_FLAGS", "")
    extra = [f"{name}={value}" for name, value in CPU_FLAGS.items() if name not in flags]
    if extra:
        os.environ["XLA_FLAGS"] = " ".join([flags, *extra]).strip()
