"""Ablation of positional encodings and their length generalisation: every encoding of POSITIONALS trained on
two corpora at 64 tokens, then evaluated at 1x, 2x and 4x that length.

    python -m launch.sweep --config=experiments/ablation_positions.py:dataset=shakespeare \
        --sweep_dir=sweeps/ablation/shakespeare --parallel=2
    python -m launch.sweep --config=experiments/ablation_positions.py:dataset=wikitext2 \
        --sweep_dir=sweeps/ablation/wikitext2 --parallel=2
    python -m launch.length_report sweeps/ablation/shakespeare sweeps/ablation/wikitext2 --factors=1,2,4 \\
        --out=docs/ablation_positions      # evaluates at 64/128/256 tokens, writes the table and the plots
    python -m llm_jax.train --config=experiments/ablation_positions.py:dataset=wikitext2 --workdir=runs/abl_rope \
        --config.model.positional=rope    # one point of the sweep

Datasets (the `dataset=NAME` option, default shakespeare): `shakespeare` is experiments/shakespeare_char.py:grain
(characters; speeches as documents on the Grain pipeline); `wikitext2` is experiments/wikitext2.py (SentencePiece
BPE, here 2048 pieces). Both pack with data.separate_documents=False, so rows are spans of running text rather
than documents whose positions restart: a row of 4x the trained length really holds positions up to 4x. Both
evaluate on the whole evaluation split (train.eval_steps=-1), so every length scores the same tokens, only with
more context. Both train the same small decoder (2 layers, d_model 64, 2 heads, no dropout) at model.max_len =
data.seq_len = 64 for STEPS steps of 16 rows; the sweep sets model.positional to each name of the registry (so
encodings added there join the ablation). Evaluation past max_len is direct except for encodings that are not
defined there (learned), scored with sliding windows (see llm_jax/training/length_eval.py). About 19 minutes on
2 busy CPU cores (docs/results.md).

`quick` (e.g. `:quick,dataset=wikitext2`) is a seconds-long smoke version for tests. Measured results:
docs/results.md, "Ablation: positional encodings and length generalisation".
"""

from __future__ import annotations

import importlib.util
import os
from typing import Callable

import ml_collections

from configs.model_sizes import apply_model_size
from configs.presets import apply_presets, apply_smoke_run, parse_variant
from llm_jax.models.positions import POSITIONALS
from llm_jax.registry import Registry

VARIANTS = ("quick",)
SEQ_LEN = 64
STEPS = 300
BATCH_SIZE = 16
DATASET_OPTION = "dataset"


def _experiment(name: str):
    """experiments/NAME.py as a module (experiments are files, not a package)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_ablation_positions_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _shakespeare(quick: bool) -> ml_collections.ConfigDict:
    config = _experiment("shakespeare_char").get_config("quick" if quick else "grain")
    config.data.update(pipeline="grain", split_by="blank_line", separate_documents=False)
    config.train.update(eval_steps=-1)  # the whole validation split (10% of the speeches) at every length
    return config


def _wikitext2(quick: bool) -> ml_collections.ConfigDict:
    config = _experiment("wikitext2").get_config("quick" if quick else None)
    config.data.update(separate_documents=False, tokenizer_vocab_size=1024 if quick else 2048)
    config.train.update(eval_steps=4 if quick else -1)  # the whole test split at every length
    return config


DATASETS: Registry[Callable[[bool], ml_collections.ConfigDict]] = Registry("ablation dataset")
DATASETS.add("shakespeare", _shakespeare)
DATASETS.add("wikitext2", _wikitext2)


def _split_dataset(arg: str | None) -> tuple[str, str]:
    """'quick,dataset=wikitext2' -> ('wikitext2', 'quick'): the dataset option and the rest of the variant."""
    dataset, rest = "shakespeare", []
    for part in filter(None, (piece.strip() for piece in (arg or "").split(","))):
        key, is_option, value = part.partition("=")
        if is_option and key == DATASET_OPTION:
            dataset = value
        else:
            rest.append(part)
    if dataset not in DATASETS:
        raise ValueError(f"unknown {DATASET_OPTION}={dataset!r} of ablation_positions; choose one of "
                         f"{', '.join(DATASETS.names())}")
    return dataset, ",".join(rest)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The dataset's recipe shrunk to the ablation's model and schedule (`quick`: its smoke size); the sweep sets
    model.positional."""
    dataset, rest = _split_dataset(arg)
    variant, presets = parse_variant(rest, "ablation_positions", VARIANTS)
    quick = variant == "quick"
    config = DATASETS.get(dataset)(quick)
    config.mesh.cpu_devices = 0  # one device: small models train fastest unsplit on a shared 2-core CPU
    if quick:
        apply_smoke_run(config)
        config.train.update(eval_steps=2)
        return apply_presets(config, presets)
    apply_model_size(config, "tiny")
    config.model.update(max_len=SEQ_LEN, dropout=0.0)
    config.data.update(seq_len=SEQ_LEN)
    config.train.update(steps=STEPS, batch_size=BATCH_SIZE, log_every=25, eval_every=0, checkpoint_every=0,
                        steps_per_dispatch=25)
    config.optimizer.update(learning_rate=3e-3, schedule="cosine", warmup_steps=STEPS // 10, min_learning_rate=3e-4)
    return apply_presets(config, presets)


def get_sweep() -> list[dict]:
    """One run per registered positional encoding."""
    return [{"model.positional": name} for name in POSITIONALS.names()]
