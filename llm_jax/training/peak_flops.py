"""Peak FLOP/s of one device in the model's compute dtype, the denominator of train/mfu.

Where the peak comes from, in this order (recorded as `source` in DIR/config.json's provenance):
  configured  train.peak_flops_per_device, when set;
  table       PEAK_TABLE, matched to `jax.devices()[0].device_kind` exactly (an H100 PCIe is not an SXM
              part), for the model's compute dtype (model.dtype): dense bfloat16/float16 tensor-core peaks, and
              float32 where JAX runs f32 matmuls on the same units at its default precision (TF32 on NVIDIA
              GPUs; one bf16 pass on TPUs);
  calibrated  on CPU: a jitted CALIBRATION_SIZE^2 matmul in the compute dtype, timed once per machine and
              cached in $LLM_JAX_CACHE_DIR (default ~/.cache/llm_jax)/peak_flops.json, keyed by CPU model,
              usable cores, jaxlib version, XLA_FLAGS (less the CPU device count) and dtype. The host's peak is shared by its local
              devices (--xla_force_host_platform_device_count splits the same cores).
Any other device kind gets no train/mfu and one warning naming the kind and train.peak_flops_per_device.
LLM_JAX_CALIBRATE_PEAK=0 turns calibration off (the test suite sets it: its runs measure no peak).

Why 2048: a square f32 matmul of that size does ~340 FLOPs per byte of operands, far beyond a CPU's
compute/bandwidth balance (~10-30), so it measures the matmul units, not memory; it is larger than the
matmuls of the CPU-sized models here, and at ~0.1 s per product on 2 cores (0.3 s in bf16) a warm-up and
the best of a few repetitions fit in about a second. A fixed size, not the model's own shapes, keeps one
peak per machine, so MFU compares across model sizes.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import os
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging

from llm_jax import host_cpu, xla_defaults

CACHE_DIR_ENV = "LLM_JAX_CACHE_DIR"
CALIBRATE_ENV = "LLM_JAX_CALIBRATE_PEAK"
CACHE_FILE = "peak_flops.json"
CALIBRATION_SIZE = 2048
CALIBRATION_BUDGET_S = 0.6  # timed repetitions after the warm-up; at least MIN_REPEATS whatever the budget
MIN_REPEATS, MAX_REPEATS = 2, 20


@dataclasses.dataclass(frozen=True)
class Peak:
    """The peak train/mfu divides by; flops_per_device None = no MFU, `note` says why."""

    flops_per_device: float | None
    source: str | None  # configured | table | calibrated | None
    dtype: str
    device_kind: str
    note: str

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _gpu(bf16: float, tf32: float, spec: str) -> dict[str, Any]:
    return {"flops": {"bfloat16": bf16, "float16": bf16, "float32": tf32}, "spec": spec}


def _tpu(bf16: float, spec: str) -> dict[str, Any]:
    return {"flops": {"bfloat16": bf16, "float32": bf16}, "spec": spec}


# Dense (no sparsity) peaks per device from the vendors' data sheets; keys are device_kind strings exactly.
_H100_SXM = _gpu(989.4e12, 494.7e12, "H100 SXM: 989 TFLOP/s bf16/fp16 dense, 495 TF32 dense")
PEAK_TABLE: dict[str, dict[str, Any]] = {
    "NVIDIA H100 80GB HBM3": _H100_SXM,
    "NVIDIA H100 PCIe": _gpu(756.5e12, 378e12, "H100 PCIe: 756 TFLOP/s bf16/fp16 dense, 378 TF32 dense"),
    "NVIDIA H200": _gpu(989.4e12, 494.7e12, "H200 SXM: 989 TFLOP/s bf16/fp16 dense, 495 TF32 dense"),
    "NVIDIA GH200 480GB": _gpu(989.4e12, 494.7e12, "GH200 (H100 die): 989 TFLOP/s bf16 dense, 495 TF32"),
    "NVIDIA GH200 144G HBM3e": _gpu(989.4e12, 494.7e12, "GH200 (H100 die): 989 TFLOP/s bf16 dense, 495 TF32"),
    "NVIDIA A100-SXM4-40GB": _gpu(312e12, 156e12, "A100: 312 TFLOP/s bf16/fp16 dense, 156 TF32 dense"),
    "NVIDIA A100-SXM4-80GB": _gpu(312e12, 156e12, "A100: 312 TFLOP/s bf16/fp16 dense, 156 TF32 dense"),
    "NVIDIA A100-PCIE-40GB": _gpu(312e12, 156e12, "A100: 312 TFLOP/s bf16/fp16 dense, 156 TF32 dense"),
    "NVIDIA A100 80GB PCIe": _gpu(312e12, 156e12, "A100: 312 TFLOP/s bf16/fp16 dense, 156 TF32 dense"),
    "NVIDIA L4": _gpu(121e12, 60e12, "L4: 121 TFLOP/s bf16/fp16 dense, 60 TF32 dense"),
    "TPU v4": _tpu(275e12, "TPU v4 chip: 275 TFLOP/s bf16"),
    "TPU v5 lite": _tpu(197e12, "TPU v5e chip: 197 TFLOP/s bf16"),
    "TPU v5": _tpu(459e12, "TPU v5p chip: 459 TFLOP/s bf16"),
    "TPU v5p": _tpu(459e12, "TPU v5p chip: 459 TFLOP/s bf16"),
    "TPU v6 lite": _tpu(918e12, "TPU v6e (Trillium) chip: 918 TFLOP/s bf16"),
}

_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logging.warning("%s", message)


def first_device() -> jax.Device:
    """The device whose kind names the peak (a job's devices are all of one kind)."""
    return jax.local_devices()[0]


def resolve_peak(configured: float | None, dtype: Any) -> Peak:
    """This machine's peak for compute dtype `dtype` (see the module docstring for the order)."""
    device = first_device()
    kind, dtype = device.device_kind, jnp.dtype(dtype).name
    if configured:
        return Peak(float(configured), "configured", dtype, kind, "train.peak_flops_per_device")
    if kind in PEAK_TABLE:
        entry = PEAK_TABLE[kind]
        if dtype in entry["flops"]:
            return Peak(entry["flops"][dtype], "table", dtype, kind, entry["spec"])
        note = (f"the peak table has no {dtype} entry for device kind {kind!r} ({entry['spec']}); "
                "set train.peak_flops_per_device for train/mfu")
    elif device.platform == "cpu":
        return _cpu_peak(dtype, kind)
    else:
        note = (f"unknown device kind {kind!r}: no train/mfu; set train.peak_flops_per_device to its dense peak "
                "FLOP/s (or add the kind to llm_jax.training.peak_flops.PEAK_TABLE)")
    _warn_once(note)
    return Peak(None, None, dtype, kind, note)


def _cpu_peak(dtype: str, kind: str) -> Peak:
    if os.environ.get(CALIBRATE_ENV, "1") == "0":
        return Peak(None, None, dtype, kind, f"{CALIBRATE_ENV}=0: CPU peak not calibrated; no train/mfu")
    host_flops, note = calibrated_host_flops(dtype)
    devices = jax.local_device_count()
    if devices > 1:
        note += f"; shared by {devices} local devices"
    return Peak(host_flops / devices, "calibrated", dtype, kind, note)


# ----------------------------------------------------------------------------- CPU calibration


def cache_path() -> str:
    directory = os.environ.get(CACHE_DIR_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "llm_jax")
    return os.path.join(directory, CACHE_FILE)


def calibration_key(dtype: str) -> dict[str, Any]:
    """What the measured peak depends on: a change in any of these measures again."""
    return {"cpu": host_cpu.model_name(), "cores": host_cpu.usable_cores(),
            "jaxlib": importlib.metadata.version("jaxlib"),
            "xla_flags": xla_defaults.without_device_count(os.environ.get("XLA_FLAGS", "")), "dtype": dtype,
            "size": CALIBRATION_SIZE}


def time_matmul(size: int, dtype: str, budget_s: float = CALIBRATION_BUDGET_S) -> float:
    """Best wall time of one jitted [size, size] @ [size, size] product on the first local device, after a
    warm-up call that compiles it; repeated while `budget_s` lasts (MIN_REPEATS to MAX_REPEATS times)."""
    device = jax.local_devices()[0]
    a, b = jax.device_put(jax.random.normal(jax.random.key(0), (2, size, size), dtype), device)
    product = jax.jit(jnp.matmul)
    product(a, b).block_until_ready()
    times, deadline = [], time.perf_counter() + budget_s
    while len(times) < MIN_REPEATS or (time.perf_counter() < deadline and len(times) < MAX_REPEATS):
        start = time.perf_counter()
        product(a, b).block_until_ready()
        times.append(time.perf_counter() - start)
    return min(times)


def measure_matmul_flops(size: int, dtype: str) -> float:
    """FLOP/s of the best repetition: 2 size^3 FLOPs per product."""
    return 2.0 * size ** 3 / time_matmul(size, dtype)


def _read_cache(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            cache = json.load(f)
        return cache if isinstance(cache, dict) else {}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        logging.warning("ignoring the unreadable peak cache %s (%s); measuring again", path, error)
        return {}


def _write_cache(path: str, cache: dict[str, Any]) -> None:
    """Atomically (a concurrent reader sees the old or the new file); a failure only costs a later re-measure."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(path), delete=False, suffix=".tmp") as f:
            json.dump(cache, f, indent=1, sort_keys=True)
        os.replace(f.name, path)
    except OSError as error:
        logging.warning("could not write the peak cache %s (%s); the next run measures again", path, error)


def calibrated_host_flops(dtype: str) -> tuple[float, str]:
    """(this host's matmul FLOP/s in `dtype`, a note on where it came from): cached, else measured now."""
    path, key = cache_path(), calibration_key(dtype)
    cache_key = json.dumps(key, sort_keys=True)
    cache = _read_cache(path)
    entry = cache.get(cache_key)
    if isinstance(entry, dict) and isinstance(entry.get("flops"), (int, float)) and entry["flops"] > 0:
        return float(entry["flops"]), f"{_describe(key)}, measured {entry.get('measured', '?')}, cached in {path}"
    start, load = time.perf_counter(), _load_average()
    flops = measure_matmul_flops(CALIBRATION_SIZE, dtype)
    logging.info("calibrated the CPU peak: %.1f GFLOP/s (%s) in %.1fs; cached in %s", flops / 1e9, _describe(key),
                 time.perf_counter() - start, path)
    if load is not None and load > key["cores"]:
        logging.warning("the CPU was busy while its peak was measured (load average %.1f on %d cores): the peak may "
                        "be low and train/mfu high; delete %s to measure again on a quiet machine", load,
                        key["cores"], path)
    measured = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    cache = _read_cache(path)  # another process may have added entries meanwhile
    cache[cache_key] = {"flops": flops, "measured": measured, "load_average": load, **key}
    _write_cache(path, cache)
    return flops, f"{_describe(key)}, measured {measured}, cached in {path}"


def _load_average() -> float | None:
    """The 1-minute load average (other processes competing for the cores), where the OS reports one."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _describe(key: dict[str, Any]) -> str:
    size = key["size"]
    return f"{size}x{size} {key['dtype']} matmul on {key['cores']} cores of {key['cpu']}"
