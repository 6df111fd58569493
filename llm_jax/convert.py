"""Imports a Hugging Face model folder into a work directory, or exports a work directory's model to one.

    python -m llm_jax.convert --from=hf --src=HF_DIR --workdir=DIR [--tokenizer_path=FILE --tokenizer=KIND]
    python -m llm_jax.convert --to=hf --workdir=DIR --dst=HF_DIR

The architectures are those of llm_jax.interop.architectures (BERT, GPT-2, Llama, T5), chosen by config.json's
`architectures` on import and by the run's model.family/model.positional on export. The import writes what a
training run leaves (DIR/config.json, DIR/tokenizer, DIR/checkpoints/0 with the full train state), so
`llm_jax.evaluate`, `llm_jax.generate`, `llm_jax.load(DIR)` and `--config.train.init_from=DIR` take it. It reads
config.json and model.safetensors (numpy, no torch) and the tokenizer, and checks them against each other before
loading any weights. The export writes config.json, model.safetensors (float32) and, where the architecture has
one llm_jax can write (BERT's vocab.txt), the tokenizer, which transformers' `from_pretrained` loads without
missing or unexpected keys.
"""

from __future__ import annotations

import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging

from llm_jax import config as config_lib
from llm_jax.cli import quiet_library_logs, run_reporting_errors
from llm_jax.errors import ConfigError
from llm_jax.interop import architectures, hf_common
from llm_jax.interop.hf_common import HF_CONFIG, HF_INDEX, HF_WEIGHTS, ConversionError  # noqa: F401 (re-exported)
from llm_jax.training import run_record
from llm_jax.models.model_config import ModelConfig, config_fields, make_model_config, model_config_to_json

_FROM = flags.DEFINE_enum("from", None, ["hf"], "import from this format (with --src)")
_TO = flags.DEFINE_enum("to", None, ["hf"], "export to this format (with --dst)")
_SRC = flags.DEFINE_string("src", None, "Hugging Face model folder to import (config.json, model.safetensors, "
                           "and BERT's vocab.txt, Llama's tokenizer.model or T5's spiece.model)")
_DST = flags.DEFINE_string("dst", None, "folder the Hugging Face model is written to")
_WORKDIR = flags.DEFINE_string("workdir", None, "work directory: written by the import, read by the export")
_DATA_PATH = flags.DEFINE_string("data_path", "", "import: data.path of the written config (the text that "
                                 "llm_jax.evaluate and training read); empty = set it when training")
_TOKENIZER_PATH = flags.DEFINE_string("tokenizer_path", "", "import: the tokenizer file the run uses (data."
                                      "tokenizer_path); GPT-2: its tiktoken ranks file, e.g. ../shared/data/"
                                      "gpt2.tiktoken; default: the folder's vocab.txt (BERT) or tokenizer.model "
                                      "(Llama)")
_TOKENIZER = flags.DEFINE_string("tokenizer", "", "import: data.tokenizer of --tokenizer_path; default: the "
                                 "architecture's (wordpiece for BERT, gpt2_bpe for GPT-2, sentencepiece for Llama)")
flags.mark_flag_as_required("workdir")

MESH_1x1x1 = {"data": 1, "fsdp": 1, "tensor": 1}
EXPECTED = (ConfigError, FileNotFoundError, ValueError)  # one-line errors (ConversionError is a ValueError)


# ----------------------------------------------------------------------------- import


def imported_config(mc: ModelConfig, data: dict[str, Any], data_path: str = "") -> ml_collections.ConfigDict:
    """The run config of an import: its model keys, the tokenizer's data settings (`data`), one device."""
    config = config_lib.default_config()
    saved = model_config_to_json(mc)  # dtypes as names
    for field in config_fields():
        config.model[field.name] = saved[field.name]
    config.data.update(**data, path=data_path)
    config.mesh.update(data=1, fsdp=1, tensor=1)
    config_lib.validate(config, 1)
    return config


def _check_param_tree(params: Any, mc: ModelConfig, source: str) -> None:
    """The imported tree is exactly the one the model's family initialises (paths and shapes); a difference
    means the converter's tensor_map (llm_jax.interop) and the model code disagree, and the error lists it."""
    from llm_jax.models.families import build_model

    tokens_BT = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    inputs = (tokens_BT, tokens_BT) if mc.family == "encoder_decoder" else (tokens_BT,)  # + decoder tokens
    boxed = jax.eval_shape(build_model(mc).init, {"params": jax.random.key(0)}, *inputs)["params"]
    expected = {jax.tree_util.keystr(p): tuple(x.shape) for p, x in _flat(nn.unbox(boxed))}
    got = {jax.tree_util.keystr(p): tuple(np.shape(x)) for p, x in _flat(params)}
    problems = [f"{label} {names[:5]}" for label, names in (
        ("not filled:", sorted(set(expected) - set(got))), ("not in the model:", sorted(set(got) - set(expected))),
        ("other shape:", sorted(k for k in set(expected) & set(got) if expected[k] != got[k]))) if names]
    if problems:
        raise ConversionError(f"{source}: the converted parameters do not match the {mc.family} family's tree "
                              f"({'; '.join(problems)})")


def _flat(tree: Any) -> list:
    return jax.tree_util.tree_flatten_with_path(tree)[0]


def _save_state(workdir: str, config: ml_collections.ConfigDict, params: Any) -> None:
    """DIR/checkpoints/0: step 0, the imported params, fresh optimizer state, the run's dropout key."""
    from llm_jax.training.checkpoint import Checkpointer
    from llm_jax.training.optimizer import build_optimizer
    from llm_jax.training.state import TrainState

    tx = build_optimizer(config.optimizer, config.train.steps)[0]
    dtype = jnp.dtype(config.model.param_dtype)
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype), params)
    rng = jax.random.key_data(jax.random.split(jax.random.key(config.train.seed))[1])
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng)
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.train.keep_checkpoints,
                                async_save=False)
    try:
        checkpointer.save(0, state, {}, force=True)
        checkpointer.wait()
    finally:
        checkpointer.close()


def _write_run_config(workdir: str, config: ml_collections.ConfigDict, mc: ModelConfig, src: str) -> None:
    from llm_jax.provenance import provenance

    run_record.write_first_start(workdir, config, mc, {**provenance(MESH_1x1x1),
                                                        "imported_from": {"format": "hf", "path": src}})


def _check_fresh_workdir(workdir: str) -> None:
    if os.path.exists(os.path.join(workdir, "checkpoints")) or os.path.exists(os.path.join(workdir, "config.json")):
        raise ConfigError(f"--workdir={workdir} already holds a run (config.json or checkpoints/); import into a "
                          "new directory")


def _read_source(src: str, vocab_pad_multiple: int) -> tuple[Any, list[str], str, ModelConfig]:
    """(converter, weight files, their name for errors, model config) of the folder `src`, checked against the
    tensor shapes in the safetensors headers; no weight is read yet."""
    config_path = os.path.join(src, HF_CONFIG)
    hf_config = hf_common.read_json(config_path)
    converter = architectures.for_hf_config(hf_config, config_path)
    converter.types.check(hf_config, config_path)
    files = hf_common.weight_files(src)
    shapes = hf_common.tensor_shapes(files, converter.canonical_name)
    weights_source = files[0] if len(files) == 1 else os.path.join(src, HF_INDEX)
    mc = make_model_config(**converter.model_config(hf_config, vocab_pad_multiple, shapes, config_path))
    converter.check_tensor_shapes(shapes, mc, weights_source, config_path)
    return converter, files, weights_source, mc


def import_hf(src: str, workdir: str, vocab_pad_multiple: int = 128, data_path: str = "",
              tokenizer_path: str = "", tokenizer: str = "") -> ModelConfig:
    """Writes the model in the Hugging Face folder `src` as a work directory; returns its model config.
    `data_path` becomes data.path of the run config (what evaluation and training read); `tokenizer_path` and
    `tokenizer` name the tokenizer the run uses (default: the architecture's, from the folder)."""
    src = os.path.abspath(src)
    _check_fresh_workdir(workdir)
    converter, files, weights_source, mc = _read_source(src, vocab_pad_multiple)
    imported = converter.tokenizer(src, mc, tokenizer or None, tokenizer_path)
    config = imported_config(mc, imported.data, data_path)
    params = converter.hf_to_params(hf_common.load_tensors(files), mc, weights_source, os.path.join(src, HF_CONFIG))
    _check_param_tree(params, mc, weights_source)
    os.makedirs(workdir, exist_ok=True)
    imported.tokenizer.save(os.path.join(workdir, "tokenizer"))
    _save_state(workdir, config, params)
    _write_run_config(workdir, config, mc, src)
    logging.info("imported %s %s (%d layers, d_model %d, heads %s) into %s", converter.name, src, mc.num_layers,
                 mc.d_model, list(mc.heads), workdir)
    return mc


# ----------------------------------------------------------------------------- export


def _restore_params(workdir: str) -> tuple[Any, Any]:
    """(run, params of the latest checkpoint) of the work directory, as generate does."""
    from llm_jax.cli import check_saved_run
    from llm_jax.training.run import build_saved_run, restore_latest_params

    check_saved_run(workdir)
    run = build_saved_run(workdir, with_data=False)
    step, params = restore_latest_params(run)
    logging.info("exporting step %d of %s", step, workdir)
    return run, jax.device_get(params)


def export_hf(workdir: str, dst: str) -> dict[str, Any]:
    """Writes the latest checkpoint of `workdir` as a Hugging Face folder `dst` of the architecture that computes
    its model (llm_jax.interop.architectures.for_model); returns its config.json."""
    from safetensors.numpy import save_file

    for name in (HF_CONFIG, HF_WEIGHTS):
        if os.path.exists(os.path.join(dst, name)):
            raise ConfigError(f"--dst={dst} already holds {name}; export into a new folder")
    run, params = _restore_params(workdir)
    mc = run.model_config
    converter = architectures.for_model(mc)
    hf_config = converter.hf_config_from_model(mc, getattr(run.tokenizer, "special_ids", {}))
    tensors = converter.params_to_hf(params, mc)
    os.makedirs(dst, exist_ok=True)
    save_file(tensors, os.path.join(dst, HF_WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(dst, HF_CONFIG), "w") as f:
        json.dump(hf_config, f, indent=2)
    converter.write_tokenizer(run.tokenizer, dst)
    logging.info("exported %s as %s to %s", workdir, hf_config["architectures"][0], dst)
    return hf_config


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if (_FROM.value is None) == (_TO.value is None):
        raise app.UsageError("give exactly one of --from=hf (with --src) and --to=hf (with --dst)")
    if _FROM.value and not _SRC.value:
        raise app.UsageError("--from=hf needs --src=HF_DIR")
    if _TO.value and not _DST.value:
        raise app.UsageError("--to=hf needs --dst=HF_DIR")
    quiet_library_logs()
    if _FROM.value:
        run_reporting_errors(lambda: import_hf(_SRC.value, _WORKDIR.value, data_path=_DATA_PATH.value,
                                               tokenizer_path=_TOKENIZER_PATH.value, tokenizer=_TOKENIZER.value),
                             EXPECTED)
    else:
        run_reporting_errors(lambda: export_hf(_WORKDIR.value, _DST.value), EXPECTED)


if __name__ == "__main__":
    app.run(main)
