"""Imports a Hugging Face BERT folder into a work directory, or exports a work directory's encoder to one.

    python -m llm_jax.convert --from=hf --src=HF_DIR --workdir=DIR
    python -m llm_jax.convert --to=hf --workdir=DIR --dst=HF_DIR

The import writes what a training run leaves (DIR/config.json, DIR/tokenizer, DIR/checkpoints/0 with the
full train state), so `llm_jax.evaluate`, `llm_jax.load(DIR)` and `--config.train.init_from=DIR` take it.
It reads config.json, model.safetensors (numpy, no torch), vocab.txt and tokenizer_config.json, and checks
them against each other before loading any weights. The export writes config.json, model.safetensors
(float32) and, for WordPiece runs, vocab.txt and tokenizer_config.json, which transformers'
`BertModel.from_pretrained` (or BertForPreTraining / BertForMaskedLM) loads without missing or unexpected keys.
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
from llm_jax.interop import hf_bert
from llm_jax.interop.hf_bert import ConversionError
from llm_jax.training import run_record
from llm_jax.models.model_config import ModelConfig, config_fields, model_config_to_json

_FROM = flags.DEFINE_enum("from", None, ["hf"], "import from this format (with --src)")
_TO = flags.DEFINE_enum("to", None, ["hf"], "export to this format (with --dst)")
_SRC = flags.DEFINE_string("src", None, "Hugging Face model folder to import (config.json, model.safetensors, "
                           "vocab.txt)")
_DST = flags.DEFINE_string("dst", None, "folder the Hugging Face model is written to")
_WORKDIR = flags.DEFINE_string("workdir", None, "work directory: written by the import, read by the export")
_DATA_PATH = flags.DEFINE_string("data_path", "", "import: data.path of the written config (the text that "
                                 "llm_jax.evaluate and training read); empty = set it when training")
flags.mark_flag_as_required("workdir")

HF_CONFIG, HF_WEIGHTS, HF_INDEX, HF_VOCAB, HF_TOKENIZER_CONFIG = (
    "config.json", "model.safetensors", "model.safetensors.index.json", "vocab.txt", "tokenizer_config.json")
IMPORT_SEQ_LEN = 128
MESH_1x1x1 = {"data": 1, "fsdp": 1, "tensor": 1}
EXPECTED = (ConfigError, FileNotFoundError, ValueError)  # one-line errors (ConversionError is a ValueError)


# ----------------------------------------------------------------------------- reading a Hugging Face folder


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file; --src must be a Hugging Face model folder")
    try:
        with open(path, encoding="utf-8") as f:
            values = json.load(f)
    except json.JSONDecodeError as error:
        raise ConversionError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from error
    except UnicodeDecodeError as error:
        raise ConversionError(f"{path}: not valid JSON (invalid UTF-8 at byte {error.start})") from error
    if not isinstance(values, dict):
        raise ConversionError(f"{path}: holds a JSON {type(values).__name__}, not an object of settings")
    return values


_HF_SIZES = ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size",
             "max_position_embeddings")  # positive ints; type_vocab_size may be 0
_HF_NUMBERS = ("layer_norm_eps", "hidden_dropout_prob", "initializer_range")


def _check_hf_types(hf_config: dict[str, Any], path: str) -> None:
    """The entries the import reads have the JSON types BERT's config.json gives them; an edited or foreign
    file is a ConversionError naming the entry, before any value is used."""
    def bad(key: str, what: str) -> ConversionError:
        return ConversionError(f"{path}: {key}={hf_config[key]!r} must be {what}")

    for key in _HF_SIZES + ("type_vocab_size",):
        value = hf_config.get(key, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "type_vocab_size" else 1):
            raise bad(key, "a positive integer" if key != "type_vocab_size" else "an integer >= 0")
    for key in _HF_NUMBERS:
        if key in hf_config and (not isinstance(hf_config[key], (int, float)) or isinstance(hf_config[key], bool)):
            raise bad(key, "a number")
    architectures = hf_config.get("architectures")
    if architectures is not None and not (isinstance(architectures, list)
                                          and all(isinstance(name, str) for name in architectures)):
        raise bad("architectures", "a list of class names")
    for key in ("model_type", "hidden_act", "position_embedding_type"):
        if key in hf_config and not isinstance(hf_config[key], str):
            raise bad(key, "a string")


def _weight_files(src: str) -> list[str]:
    """model.safetensors, or the shards its index names."""
    single, index = os.path.join(src, HF_WEIGHTS), os.path.join(src, HF_INDEX)
    if os.path.isfile(single):
        return [single]
    if os.path.isfile(index):
        weight_map = _read_json(index).get("weight_map", {})
        if not isinstance(weight_map, dict) or not all(isinstance(shard, str) for shard in weight_map.values()):
            raise ConversionError(f"{index}: 'weight_map' must map tensor names to shard file names")
        return [os.path.join(src, shard) for shard in sorted(set(weight_map.values()))]
    found = ", ".join(sorted(os.listdir(src))) if os.path.isdir(src) else "the folder does not exist"
    raise FileNotFoundError(f"{single}: no such file (found: {found}); only safetensors weights are read: "
                            "re-save a pytorch_model.bin with transformers' save_pretrained(safe_serialization=True)")


def _tensor_shapes(files: list[str]) -> dict[str, tuple[int, ...]]:
    """Canonical tensor name -> shape, read from the safetensors headers only."""
    from safetensors import SafetensorError, safe_open

    shapes = {}
    for path in files:
        try:
            with safe_open(path, framework="numpy") as f:
                for name in f.keys():
                    shapes[hf_bert.canonical_name(name)] = tuple(f.get_slice(name).get_shape())
        except (OSError, SafetensorError) as error:
            raise ConversionError(f"{path}: not a readable safetensors file ({error})") from error
    return shapes


def _load_tensors(files: list[str]) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    tensors = {}
    for path in files:
        try:
            tensors.update(load_file(path))
        except (TypeError, ValueError, SafetensorError) as error:  # e.g. bfloat16, which numpy has no dtype for
            raise ConversionError(f"{path}: cannot be read into numpy ({error}); save it as float32 or float16") \
                from error
    return tensors


def _lowercase(src: str) -> bool:
    """tokenizer_config.json's do_lower_case (BertTokenizer's default True when absent)."""
    path = os.path.join(src, HF_TOKENIZER_CONFIG)
    return bool(_read_json(path).get("do_lower_case", True)) if os.path.isfile(path) else True


def _read_vocab(src: str, rows: int) -> bytes:
    """vocab.txt's bytes; its line count must be the embedding's row count."""
    from llm_jax.data.tokenizers import read_wordpiece_vocab

    path = os.path.join(src, HF_VOCAB)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file; the import needs the model's WordPiece vocab.txt")
    with open(path, "rb") as f:
        vocab_bytes = f.read()
    tokens = read_wordpiece_vocab(vocab_bytes, path)
    if len(tokens) != rows:
        raise ConversionError(f"{path}: vocab.txt has {len(tokens)} tokens but embeddings have {rows} rows")
    return vocab_bytes


# ----------------------------------------------------------------------------- import


def imported_config(mc: ModelConfig, vocab_path: str, lowercase: bool,
                    data_path: str = "") -> ml_collections.ConfigDict:
    """The run config of an imported BERT: its model keys, WordPiece data, masked-LM objective, one device."""
    config = config_lib.default_config()
    saved = model_config_to_json(mc)  # dtypes as names
    for field in config_fields():
        config.model[field.name] = saved[field.name]
    config.data.update(tokenizer="wordpiece", tokenizer_path=os.path.abspath(vocab_path), lowercase=lowercase,
                       objective="masked_lm", seq_len=min(IMPORT_SEQ_LEN, mc.max_len),
                       sentence_task="nsp" if "nsp" in mc.heads else "none", path=data_path)
    config.mesh.update(data=1, fsdp=1, tensor=1)
    config_lib.validate(config, 1)
    return config


def _check_param_tree(params: Any, mc: ModelConfig, source: str) -> None:
    """The imported tree is exactly the one the encoder family initialises (paths and shapes); a difference
    means llm_jax.interop.hf_bert.tensor_map and the model code disagree, and the error lists it."""
    from llm_jax.models.families import build_model

    tokens_BT = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    boxed = jax.eval_shape(build_model(mc).init, {"params": jax.random.key(0)}, tokens_BT)["params"]
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


def import_hf(src: str, workdir: str, vocab_pad_multiple: int = 128, data_path: str = "") -> ModelConfig:
    """Writes the BERT in the Hugging Face folder `src` as a work directory; returns its model config.
    `data_path` becomes data.path of the run config (what evaluation and training read)."""
    from llm_jax.data.tokenizers import WordPieceTokenizer

    src = os.path.abspath(src)
    _check_fresh_workdir(workdir)
    config_path = os.path.join(src, HF_CONFIG)
    hf_config = _read_json(config_path)
    _check_hf_types(hf_config, config_path)
    files = _weight_files(src)
    shapes = _tensor_shapes(files)
    weights_source = files[0] if len(files) == 1 else os.path.join(src, HF_INDEX)
    mc = ModelConfig(**hf_bert.model_config_from_hf(hf_config, vocab_pad_multiple, shapes, source=config_path))
    hf_bert.check_tensor_shapes(shapes, mc, weights_source, config_path)
    lowercase = _lowercase(src)
    vocab_bytes = _read_vocab(src, mc.vocab_size)
    config = imported_config(mc, os.path.join(src, HF_VOCAB), lowercase, data_path)
    params = hf_bert.hf_to_params(_load_tensors(files), mc, weights_source, config_path)
    _check_param_tree(params, mc, weights_source)
    os.makedirs(workdir, exist_ok=True)
    WordPieceTokenizer(vocab_bytes, os.path.join(src, HF_VOCAB), lowercase=lowercase).save(
        os.path.join(workdir, "tokenizer"))
    _save_state(workdir, config, params)
    _write_run_config(workdir, config, mc, src)
    logging.info("imported %s (%d layers, d_model %d, heads %s, pooler %s) into %s", src, mc.num_layers,
                 mc.d_model, list(mc.heads), mc.pooler, workdir)
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


def _write_vocab(tokenizer: Any, dst: str) -> None:
    """vocab.txt and tokenizer_config.json for WordPiece runs; other tokenizers have no BERT vocab file."""
    if getattr(tokenizer, "kind", None) != "wordpiece":
        logging.warning("vocab.txt not exported: the run's tokenizer is %r, which transformers' BertTokenizer "
                        "cannot read (it reads WordPiece vocab.txt files only); tokenize with llm_jax's "
                        "tokenizer in DIR/tokenizer", getattr(tokenizer, "kind", type(tokenizer).__name__))
        return
    with open(os.path.join(dst, HF_VOCAB), "wb") as f:
        f.write(tokenizer.file_bytes)
    tokenizer_config = {"tokenizer_class": "BertTokenizer", "do_lower_case": tokenizer.lowercase,
                        "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
                        "mask_token": "[MASK]"}
    with open(os.path.join(dst, HF_TOKENIZER_CONFIG), "w") as f:
        json.dump(tokenizer_config, f, indent=2)


def export_hf(workdir: str, dst: str) -> dict[str, Any]:
    """Writes the latest checkpoint of `workdir` as a Hugging Face BERT folder `dst`; returns its config.json."""
    from safetensors.numpy import save_file

    for name in (HF_CONFIG, HF_WEIGHTS):
        if os.path.exists(os.path.join(dst, name)):
            raise ConfigError(f"--dst={dst} already holds {name}; export into a new folder")
    run, params = _restore_params(workdir)
    mc = run.model_config
    pad_id = getattr(run.tokenizer, "special_ids", {}).get("pad", 0)
    hf_config = hf_bert.hf_config_from_model(mc, pad_token_id=pad_id)
    skipped = sorted(set(mc.heads) - set(hf_bert.export_config(mc).heads))
    if skipped or (mc.pooler and not hf_bert.export_config(mc).pooler):
        logging.warning("not exported (no tensors in %s): heads %s%s", hf_config["architectures"][0], skipped,
                        ", the pooler" if mc.pooler and not hf_bert.export_config(mc).pooler else "")
    tensors = hf_bert.params_to_hf(params, mc)
    os.makedirs(dst, exist_ok=True)
    save_file(tensors, os.path.join(dst, HF_WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(dst, HF_CONFIG), "w") as f:
        json.dump(hf_config, f, indent=2)
    _write_vocab(run.tokenizer, dst)
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
        run_reporting_errors(lambda: import_hf(_SRC.value, _WORKDIR.value, data_path=_DATA_PATH.value), EXPECTED)
    else:
        run_reporting_errors(lambda: export_hf(_WORKDIR.value, _DST.value), EXPECTED)


if __name__ == "__main__":
    app.run(main)
