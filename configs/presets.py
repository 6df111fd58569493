"""Experiment variants with presets: `--config=experiments/X.py:quick,size=nano,mesh=fsdp`.

The part after the colon is a comma-separated list: at most one named variant of the experiment (`quick`,
`sop`, ...) and `size=NAME` / `mesh=NAME` / `arch=NAME` options naming presets of `configs/model_sizes.py`,
`configs/meshes.py` and `ARCHITECTURES` below. The presets apply last, over the experiment's own choices, so any
experiment runs at any preset size, architecture and mesh without a new file.
"""

from __future__ import annotations

from typing import Callable, Sequence

import ml_collections

from configs.meshes import apply_mesh
from configs.model_sizes import apply_model_size
from llm_jax.registry import Registry

# decoder architectures: the model keys of a published family (sizes stay with `size=`; grouped-query attention
# is --config.model.num_kv_heads=K, which the llama preset leaves to the experiment). These are the keys
# `python -m llm_jax.convert --from=hf` sets for a GPT2LMHeadModel / LlamaForCausalLM folder.
ARCHITECTURES: Registry[dict] = Registry("architecture")
ARCHITECTURES.add("gpt2", dict(positional="learned", norm="layernorm", norm_position="pre", mlp="standard",
                               activation="gelu_tanh", tie_embeddings=True, use_bias=True))
ARCHITECTURES.add("llama", dict(positional="rope", norm="rmsnorm", norm_position="pre", mlp="gated",
                                activation="silu", tie_embeddings=False, use_bias=False))


def apply_architecture(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """`config` with the model keys of architecture `name` (an unknown name lists the known ones)."""
    config.model.update(**ARCHITECTURES.get(name))
    return config


PRESETS: dict[str, Callable[[ml_collections.ConfigDict, str], ml_collections.ConfigDict]] = {
    "size": apply_model_size, "mesh": apply_mesh, "arch": apply_architecture}


def parse_variant(arg: str | None, experiment: str, variants: Sequence[str]) -> tuple[str | None, dict[str, str]]:
    """'quick,size=nano' -> ("quick", {"size": "nano"}); an unknown variant or option says what is known."""
    variant, presets = None, {}
    for part in filter(None, (piece.strip() for piece in (arg or "").split(","))):
        key, is_option, value = part.partition("=")
        if is_option:
            if key not in PRESETS:
                raise ValueError(f"unknown option {key!r} in variant {arg!r} of {experiment}; "
                                 f"options are {', '.join(f'{name}=NAME' for name in PRESETS)}")
            presets[key] = value
        elif part not in variants:
            known = ", ".join(variants) if variants else "none"
            raise ValueError(f"unknown variant {part!r} of {experiment}; its variants are: {known} "
                             f"(with any of {', '.join(f'{name}=NAME' for name in PRESETS)})")
        elif variant is not None:
            raise ValueError(f"variant {arg!r} of {experiment} names two variants ({variant}, {part}); give one")
        else:
            variant = part
    return variant, presets


def apply_presets(config: ml_collections.ConfigDict, presets: dict[str, str]) -> ml_collections.ConfigDict:
    """`config` with each preset of `parse_variant` applied (KeyError listing the names for an unknown one)."""
    for option, name in presets.items():
        try:
            PRESETS[option](config, name)
        except KeyError as error:
            raise ValueError(f"{option}={name}: {error.args[0]}") from None
    return config


def apply_smoke_run(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The `:quick` variant of the WikiText-2 experiments: the tiny size at 32 tokens, a 1024-piece tokenizer,
    20 steps in two dispatches, no checkpoints or periodic evaluation; seconds on a CPU, for tests and smoke runs."""
    apply_model_size(config, "tiny")
    config.model.update(max_len=32, dropout=0.0)
    config.data.update(seq_len=32, tokenizer_vocab_size=1024)
    config.train.update(steps=20, batch_size=8, log_every=10, eval_every=0, eval_steps=4, checkpoint_every=0,
                        steps_per_dispatch=10)
    config.optimizer.update(warmup_steps=5)
    return config
