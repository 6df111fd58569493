"""CPU-only program changes, selected by `model.cpu_tuning` (auto, on, off).

Two changes made XLA:CPU's train step faster and compute the same function:

- a fusion barrier on each block's residual-stream gradient (`materialize_cotangent`, used by models/blocks.py):
  without it XLA:CPU fuses that gradient, a sum over every later layer, into each consumer and recomputes it
  there, so backward cost grew with layers squared (4 layers took 6x the time of 1);
- a hand-written norm backward (`models/norms.py`) that reuses the saved normalised input, where autodiff
  left XLA:CPU re-deriving the forward chain inside large transposing fusions (~25% of the shakespeare step).

Both are `jax.custom_vjp` functions, which block forward-mode autodiff (jax.jvp, jacfwd) and hide the
program from GPU and TPU fusion heuristics that do not need them. `auto` (the default) therefore applies
them only when the backend that traces the model is the CPU; `on` and `off` force them, e.g. to compare
the two programs on one machine (tests/test_cpu_tuning.py checks they give the same loss and gradients).
"""

from __future__ import annotations

from typing import Callable

import jax

from llm_jax.registry import Registry

# name -> () -> whether the CPU-only changes are applied to the program being traced
CPU_TUNING: Registry[Callable[[], bool]] = Registry("cpu tuning")
CPU_TUNING.add("auto", lambda: jax.default_backend() == "cpu")
CPU_TUNING.add("on", lambda: True)
CPU_TUNING.add("off", lambda: False)


def cpu_tuned(setting: str) -> bool:
    """Whether `model.cpu_tuning=setting` applies the CPU-only changes to the program traced now."""
    return CPU_TUNING.get(setting)()


@jax.custom_vjp
def materialize_cotangent(x: jax.Array) -> jax.Array:
    """Identity whose gradient is materialised (an optimization barrier on the cotangent).

    Without it XLA:CPU fuses the residual stream's gradient, a sum over every later layer, into each consumer
    and recomputes it there: backward cost grows with layers squared (measured on CPU: 4 layers took 6x
    the time of 1). The barrier makes each block boundary a materialised buffer.
    """
    return x


materialize_cotangent.defvjp(lambda x: (x, None), lambda _, g: (jax.lax.optimization_barrier(g),))


def _identity(x: jax.Array) -> jax.Array:
    return x


def residual_barrier(setting: str) -> Callable[[jax.Array], jax.Array]:
    """What a block applies to its residual stream between branches: the barrier when tuned, else identity."""
    return materialize_cotangent if cpu_tuned(setting) else _identity
