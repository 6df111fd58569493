"""Config schema, experiment files and validation errors that name the key."""

from __future__ import annotations

import importlib.util
import math
import pathlib

import pytest

from conftest import REPO_ROOT
from llm_jax import config as config_lib

EXPERIMENTS = sorted((REPO_ROOT / "experiments").glob("*.py"))


def _load_experiment(path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _variants(module) -> list[str | None]:
    return [None] + list(getattr(module, "VARIANTS", ()))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_every_experiment_builds_and_validates(path):
    module = _load_experiment(path)
    assert module.__doc__ and "python -m llm_jax.train" in module.__doc__, "the docstring gives the command"
    for variant in _variants(module):
        config = module.get_config(variant)
        config_lib.validate(config, num_devices=1)
        for overrides in getattr(module, "get_sweep", lambda: [])():
            config_lib.validate(config_lib.override(module.get_config(variant), overrides.items()), 1)


def test_default_config_is_locked_against_unknown_keys():
    config = config_lib.default_config()
    with pytest.raises(AttributeError):
        config.model.nmu_layers = 3
    with pytest.raises(config_lib.ConfigError, match="unknown config key model.nmu_layers"):
        config_lib.override(config, [("model.nmu_layers", 3)])


def test_docs_config_reference_is_current():
    committed = (REPO_ROOT / "docs" / "config.md").read_text()
    assert committed.strip() == config_lib.config_reference_markdown().strip(), (
        "docs/config.md is stale: regenerate it with `python -m llm_jax.config > docs/config.md`")


@pytest.mark.parametrize("changes, devices, message", [
    ({"mesh.data": 3}, 8, r"mesh data\*fsdp\*tensor = 3"),
    ({"mesh.data": 2, "mesh.fsdp": -1, "mesh.tensor": -1}, 8, "only one mesh axis may be -1"),
    ({"mesh.tensor": 3}, 8, "cannot fill 8 devices"),
    ({"train.batch_size": 12, "mesh.data": 8}, 8, r"train.batch_size=12 .* not divisible by mesh.data\*mesh.fsdp=8"),
    ({"model.num_heads": 5}, 1, "model.num_heads=5 does not divide model.d_model=128"),
    ({"model.num_kv_heads": 3}, 1, "model.num_kv_heads=3 must divide model.num_heads=4"),
    ({"model.positional": "t5_buckets"}, 1, "model.positional='t5_buckets' is not one of"),
    ({"optimizer.schedule": "cosin"}, 1, "optimizer.schedule='cosin' is not one of"),
    ({"optimizer.grad_accum_steps": 5}, 1, "not divisible by optimizer.grad_accum_steps=5"),
    ({"data.seq_len": 128}, 1, "data.seq_len=128 exceeds model.max_len=64"),
])
def test_bad_values_name_the_key(changes, devices, message):
    config = config_lib.override(config_lib.default_config(), changes.items())
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.validate(config, num_devices=devices)


def test_mesh_fill_axis():
    config = config_lib.default_config()
    config.mesh.update(data=-1, fsdp=2, tensor=2)
    assert config_lib.resolve_mesh_shape(config.mesh, 8) == {"data": 2, "fsdp": 2, "tensor": 2}


def test_saved_config_round_trip():
    config = config_lib.default_config()
    config.model.num_kv_heads = 2
    rebuilt = config_lib.config_from_dict(config_lib.config_to_dict(config))
    assert rebuilt.to_dict() == config.to_dict()


def test_presets_build_valid_configs():
    from configs.meshes import MESHES, apply_mesh
    from configs.model_sizes import MODEL_SIZES, apply_model_size

    for size in MODEL_SIZES:
        config = apply_model_size(config_lib.default_config(), size)
        config.data.seq_len = min(config.data.seq_len, config.model.max_len)
        config_lib.validate(config, num_devices=1)
    for mesh in MESHES:
        config = apply_mesh(config_lib.default_config(), mesh)
        config.train.batch_size = 16
        sizes = MESHES.get(mesh).values()
        config_lib.validate(config, num_devices=8 if -1 in sizes else math.prod(sizes))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda path: path.stem)
def test_every_experiment_takes_size_and_mesh_presets_over_its_own_choices(path):
    """`:VARIANT,size=NAME,mesh=NAME` on any experiment: the presets win, the variant still applies."""
    from configs.meshes import MESHES
    from configs.model_sizes import MODEL_SIZES

    module = _load_experiment(path)
    variant = module.VARIANTS[0]
    plain = module.get_config(variant)
    config = module.get_config(f"{variant},size=micro,mesh=fsdp_tensor")
    assert {key: config.model[key] for key in MODEL_SIZES.get("micro")} == MODEL_SIZES.get("micro")
    assert {key: config.mesh[key] for key in MESHES.get("fsdp_tensor")} == MESHES.get("fsdp_tensor")
    assert config.train.to_dict() == plain.train.to_dict()  # the variant's own choices are kept
    with pytest.raises(ValueError, match=r"unknown variant 'nope' of .*variants are: .*size=NAME"):
        module.get_config("nope")
    with pytest.raises(ValueError, match=r"size=huge: unknown model size 'huge'; choose one of .*gpt2_small"):
        module.get_config("size=huge")
    with pytest.raises(ValueError, match=r"unknown option 'sizes'"):
        module.get_config("sizes=micro")
