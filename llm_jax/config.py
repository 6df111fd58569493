"""Every experiment-config key, declared once with its default and meaning, and its validation.

Experiment files start from `default_config()` and change what they need; the ConfigDict is locked, so a
misspelt key fails where it is written. `validate(config, num_devices)` checks values against each other
and against the machine before anything is compiled, naming the key that is wrong.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from typing import Any, Mapping, Sequence

import ml_collections
from ml_collections import config_dict

from llm_jax.errors import ConfigError, one_line


@dataclasses.dataclass(frozen=True)
class Key:
    """One config key: its default, its meaning, and (for component names) the registry it names."""

    default: Any
    help: str
    registry: str | None = None  # "module:ATTRIBUTE" of a llm_jax.registry.Registry
    type: type | None = None  # needed when the default is None
    free_on_resume: bool = False  # changes only the program or the schedule of work, not what is trained

    def registry_names(self) -> list[str]:
        """The names registered in `registry`, imported only now, when a value is checked or documented.

        A string and not the Registry object, because the dependency runs the other way: component modules
        import this one (the tokenizers read its defaults), so importing them here would be a cycle, and this
        module stays free of JAX, Flax and Grain (`import llm_jax.config` loads none of them) for flag parsing.
        A misspelt path fails at once: generating docs/config.md (a test) resolves every key's registry."""
        module_name, attribute = self.registry.split(":")
        return getattr(importlib.import_module(module_name), attribute).names()


DEFAULT_LOGICAL_AXIS_RULES = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("layers", None),  # the stacked axis of model.scan_layers: every layer on every device
    # activations
    ("batch", ("data", "fsdp")),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)

def _model_keys() -> dict[str, Key]:
    """The `model` section: the config fields of the frozen ModelConfig, declared there once."""
    from llm_jax.models.model_config import config_fields

    return {field.name: Key(field.default, field.metadata["help"], field.metadata["registry"], field.metadata["type"],
                            field.metadata["free_on_resume"])
            for field in config_fields()}


SCHEMA: dict[str, dict[str, Key]] = {
    "model": _model_keys(),
    "data": {
        "pipeline": Key("grain", "input pipeline: grain (documents shuffled per epoch, tokenized, packed, sharded "
                                 "by process) or windows (nanoGPT random windows of one token stream)",
                        "llm_jax.data.pipeline:PIPELINES"),
        "source": Key("text_file", "where the documents come from", "llm_jax.data.sources:SOURCES"),
        "path": Key("", "files or globs (comma-separated) of the train split for source=text_file|jsonl|tsv"),
        "eval_path": Key("", "files or globs of the evaluation split (data.eval_split); empty = hold out the last "
                             "data.validation_fraction of the train records", free_on_resume=True),
        "test_path": Key("", "files or globs of a held-out test split, read as split 'test' and evaluated only when "
                             "asked (python -m llm_jax.evaluate --split=test): never trained or tuned on", free_on_resume=True),
        "split_by": Key("blank_line", "text_file documents: blank_line (paragraphs), line, or file (one per file)"),
        "text_field": Key("", "record field holding the text: the JSONL field (empty = 'text'); for TFDS catalog "
                              "datasets empty = the first known text feature"),
        "text_columns": Key(("text",), "TSV text column(s): one, or two for sentence pairs (header names or 0-based)"),
        "label_column": Key("", "TSV label column (with data.labels)"),
        "labels": Key((), "allowed TSV labels; a row with another label is bad input"),
        "has_header": Key(True, "TSV files start with a header row"),
        "tfds_name": Key("", "TFDS catalog dataset for source=tfds, e.g. lm1b, imdb_reviews or glue/sst2"),
        "tfds_data_dir": Key("", "where TFDS datasets are prepared and read; empty = $TFDS_DATA_DIR or "
                                 "~/tensorflow_datasets", free_on_resume=True),
        "train_split": Key("train", "split trained on"),
        "eval_split": Key("validation", "split evaluated during training", free_on_resume=True),
        "skip_bad_records": Key(False, "skip (and count in data/skipped_records) bad input records instead of failing"),
        "mixture": Key((), "pretraining mixture: dicts of source keys (source, path, tfds_name, ...) with a 'weight'; "
                           "train documents are sampled from them by weight, evaluation uses the top-level source"),
        "objective": Key("causal_lm", "the training task: its rows, batch keys, loss and metrics",
                         "llm_jax.tasks:TASKS"),
        "label_field": Key("", "JSONL (or TFDS catalog) field holding a record's label (classification; one of "
                               "data.labels; TFDS ClassLabel ids are used as they are)"),
        "text_b_field": Key("", "JSONL (or TFDS catalog) field holding the second text of a pair (classification), "
                                "e.g. sentence2 of glue/mrpc with data.text_field=sentence1"),
        "words_field": Key("words", "JSONL field with a record's words (token classification)"),
        "tags_field": Key("tags", "JSONL field with one tag per word (token classification; each in data.labels)"),
        "conll_columns": Key((0, -1), "CoNLL source: the (word, tag) column indices of each line"),
        "mlm_probability": Key(0.15, "masked_lm: share of tokens selected for prediction (80% mask, 10% random, "
                                     "10% unchanged)"),
        "whole_word_masking": Key(False, "masked_lm: select whole words (a token starting with a word boundary "
                                         "and its continuation pieces) instead of single tokens"),
        "sentence_task": Key("nsp", "masked_lm: second objective on sentence pairs: nsp (next sentence), sop "
                                    "(sentence order) or none (single segments)"),
        "pair_fields": Key(("prompt", "response"), "pair sources (pairs_jsonl, pairs_tsv): the (inputs, targets) JSONL "
                                                   "fields or TSV columns (header names or 0-based), e.g. sft's "
                                                   "prompt and response"),
        "sft_template": Key("{prompt}", "sft: str.format template of the prompt text before the response, with one "
                                        "{prompt}, e.g. 'Question: {prompt}\\nAnswer:' (prompt generate the same way)"),
        "noise_density": Key(0.15, "span_corruption: share of each chunk's tokens hidden in noise spans"),
        "mean_noise_span_length": Key(3.0, "span_corruption: mean length of a noise span (T5: 3)"),
        "num_sentinels": Key(100, "encoder-decoder objectives: ids reserved above the tokenizer's vocabulary for "
                                  "T5's sentinels <extra_id_0> (the top id) .. <extra_id_{n-1}>"),
        "targets_seq_len": Key(0, "encoder-decoder objectives: decoder tokens per row; 0 = what span corruption "
                                  "needs for data.seq_len input tokens, or data.seq_len for seq2seq"),
        "input_prefix": Key("", "seq2seq: text put before every input, e.g. 'sst2 sentence: ' (T5's task prefixes)"),
        "target_labels": Key((), "seq2seq on labelled records: the target text of each of data.labels, e.g. "
                                 "('negative', 'positive'); empty = the labels themselves"),
        "packing": Key("concat_split", "how documents fill rows of seq_len tokens", "llm_jax.data.packing:PACKINGS"),
        "packing_bins": Key(16, "open rows of first_fit packing"),
        "separate_documents": Key(True, "packed rows carry segment ids and positions: no attention or targets across "
                                        "documents, positions restart per document"),
        "num_workers": Key(0, "Grain worker processes for tokenizing and packing (0 = in the training process)"),
        "read_threads": Key(0, "threads reading and tokenizing records ahead in each process (0 = on demand; "
                               "on a 2-core CPU that is fastest, hosts reading remote storage want more)"),
        "tokenizer": Key("char", "tokenizer", "llm_jax.data.tokenizers:TOKENIZERS"),
        "tokenizer_path": Key("", "existing tokenizer file: GPT-2's ranks file for tokenizer=gpt2_bpe (required, "
                                  "e.g. ../shared/data/gpt2.tiktoken); a SentencePiece .model for "
                                  "tokenizer=sentencepiece (then no training); a BERT vocab.txt for tokenizer=wordpiece"),
        "tokenizer_vocab_size": Key(8192, "vocabulary size of a tokenizer trained on the text "
                                          "(tokenizer=sentencepiece without tokenizer_path)"),
        "lowercase": Key(True, "tokenizer=wordpiece: lowercase and strip accents first (uncased BERT vocabularies)"),
        "sentencepiece_model_type": Key("unigram", "SentencePiece training algorithm: unigram or bpe"),
        "tokenizer_max_chars": Key(50_000_000, "characters of the train split a tokenizer is trained on"),
        "seq_len": Key(64, "tokens per training example (<= model.max_len)"),
        "validation_fraction": Key(0.1, "held-out evaluation share when no evaluation split is given (records for "
                                        "pipeline=grain, the token-stream tail for pipeline=windows)"),
        "seed": Key(0, "seed of shuffling and batch sampling (independent of train.seed)"),
    },
    "train": {
        "steps": Key(2000, "optimizer updates in the whole run", free_on_resume=True),
        "batch_size": Key(12, "global batch size in sequences per optimizer update"),
        "seed": Key(0, "seed of parameter init and dropout"),
        "log_every": Key(100, "steps between train metric logs", free_on_resume=True),
        "eval_every": Key(500, "steps between evaluations (0 = only at the end)", free_on_resume=True),
        "eval_steps": Key(20, "batches per evaluation (-1 = the whole evaluation split, pipeline=grain)",
                          free_on_resume=True),
        "checkpoint_every": Key(1000, "steps between checkpoints (0 = only at the end)", free_on_resume=True),
        "keep_checkpoints": Key(2, "checkpoints kept on disk", free_on_resume=True),
        "steps_per_dispatch": Key(20, "optimizer steps fused into one device call (lax.scan)", free_on_resume=True),
        "peak_flops_per_device": Key(None, "peak FLOP/s of one device for train/mfu; None = the device table, "
                                           "or on CPU a calibrated matmul (README: How MFU is computed)", type=float,
                                     free_on_resume=True),
        "init_from": Key("", "work directory (a run, or an import by llm_jax.convert) whose weights start this run; "
                             "parameters the task adds (new heads) are freshly initialised", free_on_resume=True),
        "nonfinite": Key("stop", "a NaN/Inf loss or gradient: stop (name the step; no state after the last good one "
                                 "is ever checkpointed) or skip (keep the previous parameters and optimizer state, "
                                 "count it in train/skipped_updates)", free_on_resume=True),
        "max_consecutive_skips": Key(20, "train.nonfinite=skip: stop after this many updates in a row were skipped",
                                     free_on_resume=True),
        "loss_spike_factor": Key(3.0, "log a warning when a step's loss exceeds this factor times the running "
                                      "average (0 = off)", free_on_resume=True),
        "freeze": Key((), "parameters kept fixed: 'embeddings', 'layers:K' (the first K blocks), 'all_but_heads', "
                          "or path regexes like 'block_0/.*'"),
    },
    "optimizer": {
        "learning_rate": Key(1e-3, "peak learning rate"),
        "schedule": Key("cosine", "learning-rate schedule", "llm_jax.training.optimizer:SCHEDULES"),
        "warmup_steps": Key(100, "linear warmup from 0 to learning_rate"),
        "min_learning_rate": Key(1e-4, "final learning rate of cosine and linear decay"),
        "decay_steps": Key(None, "step where decay ends; None = train.steps", type=int),
        "weight_decay": Key(0.1, "AdamW decoupled weight decay (not on norms, biases or other 1-D params)"),
        "b1": Key(0.9, "Adam beta1"),
        "b2": Key(0.99, "Adam beta2"),
        "eps": Key(1e-8, "Adam epsilon"),
        "grad_clip_norm": Key(1.0, "global-norm gradient clipping (0 = off)"),
        "grad_accum_steps": Key(1, "micro-batches accumulated into one update"),
        "lr_multipliers": Key((), "learning-rate factors by parameter path: (regex, factor) pairs, e.g. "
                                  "(('crf/.*', 100.0),) for a CRF layer that starts at zero beside a pretrained encoder"),
        "layer_decay": Key(1.0, "layer-wise learning-rate decay: block i of L gets learning_rate * layer_decay^(L-i), "
                                "embeddings layer_decay^(L+1), heads 1 (1 = off)"),
        "z_loss": Key(0.0, "z-loss coefficient: adds z_loss * mean(logsumexp(logits)^2) over the weighted targets of "
                           "the vocabulary softmax (causal_lm, masked_lm) to the training loss, logged as train/z_loss "
                           "(PaLM uses 1e-4; 0 = off)"),
    },
    "mesh": {
        "data": Key(-1, "data-parallel axis size (-1 = the remaining devices)", free_on_resume=True),
        "fsdp": Key(1, "fully-sharded data-parallel axis size (-1 = the remaining devices)", free_on_resume=True),
        "tensor": Key(1, "tensor-parallel axis size (-1 = the remaining devices)", free_on_resume=True),
        "cpu_devices": Key(0, "split the CPU into this many XLA devices before JAX starts, so each core trains its "
                              "own data shard (small models on CPU: see llm_jax/xla_defaults.py); -1 = one per "
                              "usable core that divides train.batch_size; 0 = JAX's single CPU device. Left alone "
                              "when XLA_FLAGS sets --xla_force_host_platform_device_count; no effect on GPU/TPU",
                           free_on_resume=True),
        "logical_axis_rules": Key(DEFAULT_LOGICAL_AXIS_RULES, "logical axis name -> mesh axes", free_on_resume=True),
    },
}

MESH_AXES = ("data", "fsdp", "tensor")
NONFINITE_POLICIES = ("stop", "skip")


def _field(key: Key) -> Any:
    if key.default is None:
        return config_dict.placeholder(key.type)
    return key.default


def default_config() -> ml_collections.ConfigDict:
    """The full config with every default, locked against new keys."""
    config = ml_collections.ConfigDict()
    for section, keys in SCHEMA.items():
        config[section] = ml_collections.ConfigDict({name: _field(key) for name, key in keys.items()})
    config.lock()
    return config


def config_reference_markdown() -> str:
    """The table of every key with its default and meaning (docs/config.md is generated from it)."""
    lines = ["# Config reference", "", "Generated by `python -m llm_jax.config`; every key, its default and meaning.",
             "", "A resumed run refuses changed keys unless they are marked *free on resume* (they change only the "
             "program or the schedule of work) or `--allow_config_change` is given.", ""]
    for section, keys in SCHEMA.items():
        lines += [f"## `{section}`", "", "| key | default | meaning |", "| --- | --- | --- |"]
        for name, key in keys.items():
            meaning = key.help
            if key.registry:
                meaning += f" ({', '.join(key.registry_names())})"
            if key.free_on_resume:
                meaning += "; *free on resume*"
            lines.append(f"| `{section}.{name}` | `{key.default!r}` | {meaning} |")
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- validation


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _check_schema(config: ml_collections.ConfigDict) -> None:
    for section in config:
        _require(section in SCHEMA, f"unknown config section {section!r}; sections are {', '.join(SCHEMA)}")
        for name in config[section]:
            _require(name in SCHEMA[section], f"unknown config key {section}.{name}; see docs/config.md")
    for section, keys in SCHEMA.items():
        for name, key in keys.items():
            if key.registry:
                value = config[section][name]
                choices = key.registry_names()
                _require(value in choices, f"{section}.{name}={value!r} is not one of {', '.join(choices)}")


def resolve_mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """Mesh axis sizes with the single -1 filled in; errors name the axis and the device count."""
    _require(int(mesh_config.get("cpu_devices", 0)) >= -1,
             f"mesh.cpu_devices={mesh_config.cpu_devices}: a device count, -1 (one per core) or 0 (JAX's default)")
    sizes = {axis: int(mesh_config[axis]) for axis in MESH_AXES}
    fill = [axis for axis, size in sizes.items() if size == -1]
    _require(len(fill) <= 1, f"only one mesh axis may be -1, got mesh.{' and mesh.'.join(fill)}")
    for axis, size in sizes.items():
        _require(size == -1 or size >= 1, f"mesh.{axis}={size}: sizes are positive or -1 (fill)")
    known = math.prod(size for size in sizes.values() if size != -1)
    if fill:
        _require(num_devices % known == 0,
                 f"mesh {sizes} cannot fill {num_devices} devices: {num_devices} is not divisible by {known}")
        sizes[fill[0]] = num_devices // known
    _require(math.prod(sizes.values()) == num_devices,
             f"mesh data*fsdp*tensor = {math.prod(sizes.values())} ({sizes}) but there are {num_devices} devices; "
             "set the sizes so their product is the device count, or one of them to -1")
    return sizes


def _check_model(model: ml_collections.ConfigDict) -> None:
    for name in ("num_layers", "num_heads", "d_model", "max_len", "vocab_pad_multiple"):
        _require(model[name] >= 1, f"model.{name}={model[name]} must be >= 1")
    if model.head_dim is None:
        _require(model.d_model % model.num_heads == 0,
                 f"model.num_heads={model.num_heads} does not divide model.d_model={model.d_model}; "
                 "change one of them or set model.head_dim")
    kv_heads = model.num_kv_heads or model.num_heads
    _require(model.num_heads % kv_heads == 0,
             f"model.num_kv_heads={kv_heads} must divide model.num_heads={model.num_heads}")
    _require(0.0 <= model.dropout < 1.0, f"model.dropout={model.dropout} must be in [0, 1)")
    for name in ("dtype", "param_dtype"):
        _require(model[name] in ("float32", "bfloat16", "float16"),
                 f"model.{name}={model[name]!r} must be float32, bfloat16 or float16")


def _check_train(config: ml_collections.ConfigDict, mesh_sizes: dict[str, int]) -> None:
    train, opt = config.train, config.optimizer
    for name in ("steps", "batch_size", "log_every", "keep_checkpoints", "steps_per_dispatch"):
        _require(train[name] >= 1, f"train.{name}={train[name]} must be >= 1")
    whole_split = train.eval_steps == -1 and config.data.pipeline == "grain"
    _require(train.eval_steps >= 1 or whole_split,
             f"train.eval_steps={train.eval_steps} must be >= 1 (or -1 for the whole split with data.pipeline=grain)")
    for name in ("eval_every", "checkpoint_every"):
        _require(train[name] >= 0, f"train.{name}={train[name]} must be >= 0")
    _require(opt.grad_accum_steps >= 1, f"optimizer.grad_accum_steps={opt.grad_accum_steps} must be >= 1")
    _require(train.batch_size % opt.grad_accum_steps == 0,
             f"train.batch_size={train.batch_size} is not divisible by optimizer.grad_accum_steps={opt.grad_accum_steps}")
    batch_shards = mesh_sizes["data"] * mesh_sizes["fsdp"]
    micro_batch = train.batch_size // opt.grad_accum_steps
    _require(micro_batch % batch_shards == 0,
             f"train.batch_size={train.batch_size} (micro-batch {micro_batch} with grad_accum_steps="
             f"{opt.grad_accum_steps}) is not divisible by mesh.data*mesh.fsdp={batch_shards}; "
             "change the batch size or the mesh")
    _require(config.data.seq_len <= config.model.max_len,
             f"data.seq_len={config.data.seq_len} exceeds model.max_len={config.model.max_len} (to evaluate a "
             "trained model at longer contexts: python -m llm_jax.evaluate --workdir=DIR --seq_len=N)")
    _require(train.nonfinite in NONFINITE_POLICIES,
             f"train.nonfinite={train.nonfinite!r} must be one of {', '.join(NONFINITE_POLICIES)}")
    _require(train.max_consecutive_skips >= 1, f"train.max_consecutive_skips={train.max_consecutive_skips} must be >= 1")
    _require(train.loss_spike_factor == 0 or train.loss_spike_factor > 1,
             f"train.loss_spike_factor={train.loss_spike_factor} must be 0 (off) or > 1")
    _require(opt.learning_rate > 0, f"optimizer.learning_rate={opt.learning_rate} must be > 0")
    _require(0 <= opt.warmup_steps, f"optimizer.warmup_steps={opt.warmup_steps} must be >= 0")
    _require(opt.z_loss >= 0, f"optimizer.z_loss={opt.z_loss} must be >= 0 (0 = off)")
    _require(0.0 < config.data.validation_fraction < 1.0,
             f"data.validation_fraction={config.data.validation_fraction} must be in (0, 1)")


SOURCE_KEYS = ("source", "path", "eval_path", "split_by", "text_field", "text_columns", "label_column", "labels",
               "has_header", "tfds_name", "train_split", "skip_bad_records")  # what a mixture component may set


def _check_data(data: ml_collections.ConfigDict) -> None:
    _require(data.split_by in ("file", "blank_line", "line"),
             f"data.split_by={data.split_by!r} must be file, blank_line or line")
    for name in ("packing_bins", "tokenizer_max_chars", "seq_len"):
        _require(data[name] >= 1, f"data.{name}={data[name]} must be >= 1")
    _require(data.num_workers >= 0, f"data.num_workers={data.num_workers} must be >= 0")
    _require(data.read_threads >= 0, f"data.read_threads={data.read_threads} must be >= 0")
    _require(not data.mixture or data.pipeline == "grain",
             "data.mixture needs data.pipeline=grain (the windows sampler reads one token stream)")
    for index, component in enumerate(data.mixture):
        where = f"data.mixture[{index}]"
        _require(isinstance(component, Mapping), f"{where}={component!r} must be a dict of source keys and 'weight'")
        unknown = sorted(set(component) - set(SOURCE_KEYS) - {"weight"})
        _require(not unknown, f"{where} has unknown keys {unknown}; allowed: weight, {', '.join(SOURCE_KEYS)}")
        weight = component.get("weight")
        _require(isinstance(weight, (int, float)) and weight > 0, f"{where}['weight']={weight!r} must be > 0")


def validate(config: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """Checks the whole config for `num_devices` devices; returns the resolved mesh shape."""
    _require(isinstance(config, ml_collections.ConfigDict),
             f"the config is a {type(config).__name__}, not a ConfigDict: an experiment's get_config() returns "
             "llm_jax.config.default_config() with its changes")
    _check_schema(config)
    _check_model(config.model)
    _check_data(config.data)
    mesh_sizes = resolve_mesh_shape(config.mesh, num_devices)
    _check_train(config, mesh_sizes)
    return mesh_sizes


def config_to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """A JSON-ready plain dict of the config (tuples become lists)."""
    return config.to_dict()


def config_from_dict(values: dict[str, Any]) -> ml_collections.ConfigDict:
    """Rebuilds a locked config from `config_to_dict` output (e.g. DIR/config.json), checking every key."""
    config = default_config()
    if not isinstance(values, Mapping):
        raise ConfigError(f"saved config is a {type(values).__name__}, not an object of config sections")
    for section, keys in values.items():
        if section not in SCHEMA:
            raise ConfigError(f"unknown config section {section!r} in saved config")
        if not isinstance(keys, Mapping):
            raise ConfigError(f"config section {section!r} in saved config is a {type(keys).__name__}, not an object")
        for name, value in keys.items():
            if name not in SCHEMA[section]:
                raise ConfigError(f"unknown config key {section}.{name} in saved config")
            _set_saved(config, section, name, value)
    return config


def _set_saved(config: ml_collections.ConfigDict, section: str, name: str, value: Any) -> None:
    """Sets one saved (JSON) value with the config's own type; a value of another type names the key."""
    try:
        if name == "logical_axis_rules":
            value = tuple((rule[0], tuple(rule[1]) if isinstance(rule[1], list) else rule[1]) for rule in value)
        elif isinstance(SCHEMA[section][name].default, tuple):
            value = tuple(value)  # JSON has lists; the config keeps its tuple type
        config[section][name] = value
    except (TypeError, ValueError, IndexError, KeyError) as error:
        raise ConfigError(f"config key {section}.{name}={value!r} in saved config has the wrong type "
                          f"({one_line(error)})") from None


def override(config: ml_collections.ConfigDict, overrides: Sequence[tuple[str, Any]]) -> ml_collections.ConfigDict:
    """Applies ("section.key", value) pairs, e.g. from a sweep, with a clear error for unknown keys."""
    for dotted, value in overrides:
        section, _, name = dotted.partition(".")
        if section not in SCHEMA or name not in SCHEMA[section]:
            raise ConfigError(f"unknown config key {dotted}; see docs/config.md")
        config[section][name] = value
    return config


if __name__ == "__main__":
    print(config_reference_markdown())
