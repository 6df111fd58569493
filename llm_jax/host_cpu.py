"""What llm_jax records and decides by about the host CPU: its model name, vector/matrix ISA extensions and
usable cores. No JAX here: `xla_defaults` uses it before JAX starts."""

from __future__ import annotations

import os
import platform

# the ISA extensions that decide which matmul and elementwise kernels XLA:CPU and PyTorch pick
ISA_PREFIXES = ("avx512", "amx", "avx_vnni")
ISA_FLAGS = ("avx", "avx2", "fma")


def _cpuinfo_field(name: str) -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return None


def model_name() -> str:
    """/proc/cpuinfo's model name (what lscpu shows), else what the platform module knows."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def isa_extensions() -> list[str]:
    """The CPU's AVX/AVX-512/AMX/FMA flags, sorted (empty off Linux)."""
    flags = (_cpuinfo_field("flags") or "").split()
    return sorted(f for f in flags if f.startswith(ISA_PREFIXES) or f in ISA_FLAGS)


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, e.g. under taskset or a container's cpuset)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def describe() -> str:
    """One line for logs, provenance and benchmark output: model, usable cores, ISA extensions."""
    return f"{model_name()}, {usable_cores()} usable cores, {' '.join(isa_extensions())}"
