"""The frozen model config: every model key declared once, with its default and meaning.

`ModelConfig`'s fields are the `model` section of the experiment config (`llm_jax.config` builds the section
from them), so adding a key is one field here. A field whose config default is None is resolved when the
config is frozen (`d_ff=None` -> 4 * d_model); `padded_vocab_size` and `heads` are derived, not config keys.
Work directories written before a key existed still load: missing keys take their defaults.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp
import ml_collections

from llm_jax.errors import ConfigError


def key(default: Any, help: str, *, registry: str | None = None, type: type | None = None,
        config: bool = True, free_on_resume: bool = False) -> Any:
    """A ModelConfig field with its meaning; `registry` names the component table ("module:ATTRIBUTE");
    `free_on_resume` marks keys that change only the program, not the parameters (e.g. the compute dtype)."""
    return dataclasses.field(default=default, metadata={"help": help, "registry": registry, "type": type,
                                                        "config": config, "free_on_resume": free_on_resume})


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Resolved model hyper-parameters (no None left after `build_model_config`); variants via `.replace(...)`."""

    family: str = key("decoder", "model family", registry="llm_jax.models.families:FAMILIES")
    num_layers: int = key(4, "Transformer blocks (the encoder's, for family=encoder_decoder)")
    num_decoder_layers: int = key(None, "decoder blocks of family=encoder_decoder; None = num_layers", type=int)
    num_heads: int = key(4, "query heads per attention layer")
    num_kv_heads: int = key(None, "key/value heads (grouped-query attention); None = num_heads", type=int)
    d_model: int = key(128, "residual stream width")
    d_ff: int = key(None, "MLP hidden width; None = 4 * d_model", type=int)
    head_dim: int = key(None, "width of one head; None = d_model // num_heads", type=int)
    vocab_size: int = key(None, "vocabulary size; None = the tokenizer's", type=int)
    vocab_pad_multiple: int = key(128, "embedding rows are padded to a multiple of this and of the mesh axes the "
                                       "vocabulary is sharded over (mesh.logical_axis_rules for vocab, act_vocab)")
    max_len: int = key(64, "longest sequence the model accepts (positions table, sliding window in generate)")
    positional: str = key("learned", "position encoding", registry="llm_jax.models.positions:POSITIONALS")
    norm: str = key("layernorm", "normalisation layer", registry="llm_jax.models.norms:NORMS")
    norm_position: str = key("pre", "pre-LN (x + f(norm(x)), GPT-2) or post-LN (norm(x + f(x)), BERT)",
                             registry="llm_jax.models.blocks:NORM_POSITIONS")
    norm_eps: float = key(1e-5, "epsilon of the norm layers")
    activation: str = key("gelu", "MLP activation", registry="llm_jax.models.mlp:ACTIVATIONS")
    mlp: str = key("standard", "MLP kind: standard and gated (GLU) use model.activation; gelu, relu, swiglu "
                               "(gated silu) and geglu (gated gelu) fix it", registry="llm_jax.models.mlp:MLPS")
    use_bias: bool = key(False, "biases in dense layers and norms")
    scale_attention_logits: bool = key(True, "divide query-key logits by sqrt(head_dim); False = T5, whose "
                                             "initialisation absorbs the scale")
    scale_embeddings: bool = key(False, "multiply token embeddings by sqrt(d_model) (the original Transformer)")
    scale_decoder_outputs: bool = key(False, "family=encoder_decoder: multiply the decoder's final states by "
                                             "d_model**-0.5 before the LM head (T5 v1.0 with its tied embedding)")
    dropout: float = key(0.0, "dropout rate on embeddings, attention output, MLP output and classifier inputs")
    tie_embeddings: bool = key(True, "LM/MLM output projection shares the token embedding")
    type_vocab_size: int = key(0, "token-type (BERT sentence A/B) embeddings; 0 = none")
    embedding_norm: bool = key(False, "a norm after the summed embeddings (BERT)")
    pooler: bool = key(False, "BERT's pooler: tanh(dense(hidden of the first token)) as the pooled output")
    num_labels: int = key(None, "classes of the classification heads; None = len(data.labels)", type=int)
    crf: bool = key(False, "token classification through a linear-chain CRF (forward-algorithm loss, Viterbi)")
    init_std: float = key(0.02, "stddev of the normal init; residual projections use init_std / sqrt(2 * num_layers)")
    embedding_init_std: float = key(None, "stddev of the token embedding's init; None = init_std (T5: 1.0, its tied "
                                          "head scales the decoder output by d_model**-0.5)", type=float)
    dtype: Any = key("float32", "compute dtype (bfloat16 for mixed precision on accelerators)", free_on_resume=True)
    param_dtype: Any = key("float32", "parameter and optimizer-state dtype")
    cpu_tuning: str = key("auto", "CPU-only program changes (a fusion barrier on each block's residual gradient, a "
                                  "hand-written norm backward; same function, faster on XLA:CPU, no forward-mode "
                                  "autodiff): auto = only when the backend is the CPU",
                          registry="llm_jax.models.cpu_tuning:CPU_TUNING", free_on_resume=True)
    scan_layers: bool = key(False, "run the blocks as one nn.scan over a single Block (parameters stacked under "
                                   "'blocks' on a leading 'layers' axis; compile time independent of depth) instead "
                                   "of a loop of block_{i} modules; llm_jax.models.layer_layout converts between them")
    remat: str = key("none", "rematerialisation of each block in the backward pass: none keeps every activation, "
                             "full recomputes the block, save_dots keeps matmul outputs, save_names keeps the "
                             "attention and MLP outputs", registry="llm_jax.models.remat:REMAT_POLICIES",
                     free_on_resume=True)
    attention_impl: str = key("xla", "attention kernel: xla (every backend), cudnn (GPU flash attention, bfloat16/"
                                     "float16) or splash (TPU Pallas, no positional bias); checked against the backend",
                              registry="llm_jax.models.attention_kernels:ATTENTION_KERNELS", free_on_resume=True)
    attention_mask: str = key("causal", "self-attention mask of family=decoder: causal, or prefix_lm (tokens of "
                                        "the prefix, e.g. an SFT prompt, read the whole prefix bidirectionally; "
                                        "the rest read causally); other families take causal only",
                              registry="llm_jax.models.attention_masks:ATTENTION_MASKS")
    padded_vocab_size: int = key(None, "embedding rows: vocab_size padded for the mesh axes that shard it",
                                  config=False)
    heads: tuple[str, ...] = key(("lm",), "output heads the task reads (names in models.heads:HEADS)", config=False)
    options: tuple[tuple[str, Any], ...] = key((), "values of the keys that components declare beside themselves "
                                                    "(component_key), read as attributes: cfg.rope_base", config=False)

    def __post_init__(self) -> None:
        resolved = {"num_kv_heads": self.num_kv_heads or self.num_heads,
                    "num_decoder_layers": self.num_decoder_layers or self.num_layers,
                    "d_ff": self.d_ff or 4 * self.d_model,
                    "head_dim": self.head_dim or (self.d_model // self.num_heads),
                    "dtype": jnp.dtype(self.dtype), "param_dtype": jnp.dtype(self.param_dtype),
                    "heads": tuple(self.heads), "options": _component_options(dict(self.options))}
        if self.vocab_size is not None and self.padded_vocab_size is None:
            resolved["padded_vocab_size"] = self.vocab_size
        for name, value in resolved.items():
            object.__setattr__(self, name, value)

    def __getattr__(self, name: str) -> Any:
        """A component key's value (only called for names that are not dataclass fields)."""
        if name.startswith("__") or name == "options":
            raise AttributeError(name)
        options = dict(object.__getattribute__(self, "options"))
        if name in options:
            return options[name]
        raise AttributeError(f"ModelConfig has no key {name!r}")

    def replace(self, **changes: Any) -> "ModelConfig":
        fields, options = _split_component_values(changes)
        if options:
            fields["options"] = tuple({**dict(self.options), **options}.items())
        return dataclasses.replace(self, **fields)

    @property
    def residual_init_std(self) -> float:
        """Init stddev of projections that write into the residual stream (GPT-2 scaling)."""
        return self.init_std / math.sqrt(2 * self.num_layers)


# ----------------------------------------------------------------------------- keys declared by components

_COMPONENT_KEYS: dict[str, dataclasses.Field] = {}
# Modules whose import registers the built-in components (and their keys); every module of the
# llm_jax.models.components package is imported too, so a new component is one new file there.
BUILTIN_COMPONENT_MODULES = ("llm_jax.models.positions", "llm_jax.models.norms", "llm_jax.models.mlp",
                             "llm_jax.models.blocks", "llm_jax.models.attention_kernels",
                             "llm_jax.models.attention_masks", "llm_jax.models.remat",
                             "llm_jax.models.families", "llm_jax.models.components")


def component_key(name: str, default: Any, help: str, *, type: type | None = None,
                  free_on_resume: bool = False) -> None:
    """Declares the config key `model.<name>` beside the component that reads it (e.g. a positional encoding's
    own hyperparameter): it joins the config schema, docs/config.md, validation and the saved model config, and
    the component reads it as `cfg.<name>`. A name that is already a key is a bug in the component."""
    known = {field.name for field in dataclasses.fields(ModelConfig)} | set(_COMPONENT_KEYS)
    if name in known:
        raise ValueError(f"model key {name!r} is declared twice (by ModelConfig or another component)")
    field = key(default, help, type=type, free_on_resume=free_on_resume)
    field.name = name
    _COMPONENT_KEYS[name] = field


def load_components() -> None:
    """Imports every module that registers components, so their names and keys are known."""
    import importlib

    for module in BUILTIN_COMPONENT_MODULES:
        importlib.import_module(module)


def _split_component_values(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(dataclass field values, component key values) of keyword arguments; unknown names stay in the first."""
    if any(name not in _COMPONENT_KEYS for name in values if not hasattr(ModelConfig, name)):
        load_components()
    options = {name: values[name] for name in values if name in _COMPONENT_KEYS}
    return {name: value for name, value in values.items() if name not in options}, options


def _component_options(options: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """Every declared component key with its value (the default unless given), sorted by name."""
    load_components()
    unknown = sorted(set(options) - set(_COMPONENT_KEYS))
    if unknown:
        raise ValueError(f"unknown component keys {unknown}; declared: {sorted(_COMPONENT_KEYS)}")
    return tuple((name, options.get(name, _COMPONENT_KEYS[name].default)) for name in sorted(_COMPONENT_KEYS))


def make_model_config(**values: Any) -> ModelConfig:
    """ModelConfig from keyword arguments that may include component keys (model.rope_base=...)."""
    fields, options = _split_component_values(values)
    return ModelConfig(**fields, options=tuple(options.items()))


def config_fields() -> list[dataclasses.Field]:
    """The `model.*` keys of the experiment config: ModelConfig's fields in declaration order, then the keys
    declared by components (component_key) by name."""
    load_components()
    own = [field for field in dataclasses.fields(ModelConfig) if field.metadata["config"]]
    return own + [_COMPONENT_KEYS[name] for name in sorted(_COMPONENT_KEYS)]


def padded_vocab(vocab_size: int, pad_multiple: int, shard_sizes: dict[str, int]) -> int:
    """Smallest multiple of lcm(pad_multiple, S) >= vocab_size, S the product of `shard_sizes`.

    `shard_sizes` are the mesh axes the vocabulary dimensions are split over (llm_jax.sharding.vocab_shard_sizes),
    so every shard gets whole rows; other mesh axes leave the size alone, and a run resumes on them.
    """
    multiple = math.lcm(pad_multiple, math.prod(shard_sizes.values()))
    return -(-vocab_size // multiple) * multiple


def check_padded_vocab(padded_vocab_size: int, vocab_size: int, shard_sizes: dict[str, int]) -> None:
    """A saved padded size must still hold the vocabulary and split evenly over this mesh's vocabulary axes."""
    saved = (f"the saved padded vocabulary size {padded_vocab_size} (model_config.padded_vocab_size in the run's "
             "config.json)")
    if padded_vocab_size < vocab_size:
        raise ConfigError(f"{saved} is smaller than the {vocab_size}-id vocabulary: the tokenizer or model.vocab_size "
                          "changed since the run was saved; resume with the run's own, or start a new work directory")
    shards = math.prod(shard_sizes.values())
    if padded_vocab_size % shards:
        axes = ", ".join(f"mesh.{axis}={size}" for axis, size in shard_sizes.items())
        raise ConfigError(f"{saved} does not split into the {shards} shards of the mesh axes the vocabulary is "
                          f"sharded over ({axes}, from mesh.logical_axis_rules for vocab/act_vocab); pick a mesh "
                          f"whose vocabulary-sharding axes multiply to a divisor of {padded_vocab_size}")


def build_model_config(model: ml_collections.ConfigDict, vocab_size: int, vocab_shard_sizes: dict[str, int],
                       heads: tuple[str, ...] = ("lm",), num_labels: int | None = None, *,
                       padded_vocab_size: int | None = None) -> ModelConfig:
    """Freezes `config.model`, filling the None defaults; `vocab_size` is the tokenizer's unless set, and
    `num_labels` the task's label count unless set.

    The embedding is padded for `vocab_shard_sizes` (see padded_vocab) unless `padded_vocab_size` is given: a
    resumed run's saved size, kept so its parameter shapes match the checkpoint, after check_padded_vocab.
    `model.attention_mask` is checked against the family (attention_masks.check_attention_mask) and
    `model.attention_impl` against this process's JAX backend (attention_kernels.check_attention_impl).
    """
    values = {field.name: model[field.name] for field in config_fields()}
    vocab = model.vocab_size or vocab_size
    if padded_vocab_size is None:
        padded_vocab_size = padded_vocab(vocab, model.vocab_pad_multiple, vocab_shard_sizes)
    else:
        check_padded_vocab(padded_vocab_size, vocab, vocab_shard_sizes)
    values.update(vocab_size=vocab, num_labels=model.num_labels or num_labels, padded_vocab_size=padded_vocab_size,
                  heads=tuple(heads))
    cfg = make_model_config(**values)
    from llm_jax.models.attention_kernels import check_attention_impl  # imports this module
    from llm_jax.models.attention_masks import check_attention_mask

    check_attention_mask(cfg)
    check_attention_impl(cfg)
    return cfg


def model_config_to_json(cfg: ModelConfig) -> dict[str, Any]:
    values = dataclasses.asdict(cfg)
    values.update(dtype=cfg.dtype.name, param_dtype=cfg.param_dtype.name, heads=list(cfg.heads))
    values.update(dict(values.pop("options")))
    return values


def model_config_from_json(values: dict[str, Any]) -> ModelConfig:
    """The saved model config; keys added since it was written take their defaults, unknown keys are an error."""
    load_components()
    known = {field.name for field in dataclasses.fields(ModelConfig)} | set(_COMPONENT_KEYS)
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"saved model config has unknown keys {unknown}: written by a newer llm_jax, or by one "
                         "with a component file (llm_jax/models/components) this checkout lacks?")
    values = {name: value for name, value in values.items() if name != "options"}
    return make_model_config(**values)
