"""Components that live in one file each: importing this package imports every module in it, so a module that
registers a component (a positional encoding, a norm, an MLP, ...) and declares its own keys with
`llm_jax.models.model_config.component_key` needs no other edit (docs/extending.md)."""

from __future__ import annotations

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
