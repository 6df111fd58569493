"""A scaling-law sweep: the shakespeare_char recipe at seven widths, each trained on 20 tokens per parameter.

    python -m launch.sweep --config=experiments/scaling_shakespeare.py --sweep_dir=sweeps/scaling
    python -m launch.report sweeps/scaling --fit=params          # eval/loss = E + A * N^(-alpha)
    python -m llm_jax.train --config=experiments/scaling_shakespeare.py:quick --workdir=/tmp/scaling_quick

Every run is experiments/shakespeare_char.py (character-level GPT on Tiny Shakespeare, learned positions,
LayerNorm, GELU, tied embeddings) at depth 2 and a width d_model in WIDTHS (heads 16 wide; one head below 32),
so the sizes differ in width only. N is the non-embedding parameter count that `launch.report --fit=params`
reads, the blocks' weight matrices: 2 layers x 12 d_model^2 (4 d^2 in attention, 8 d^2 in the MLP), 6k to
393k. Each run trains on TOKENS_PER_PARAM = 20 tokens per non-embedding parameter, Chinchilla's
compute-optimal ratio (Hoffmann et al. 2022), so train.steps = ceil(20 N / (batch_size x seq_len)): 160 to
10240 steps of 768 tokens, 16.3M tokens in all. Learning rate, warmup (5% of the steps) and the cosine decay to
a tenth are those of the recipe; one evaluation of 40 batches at the end, no checkpoints. To try the pipeline
on the smallest size only: `--only=d_model=16` (seconds), or train it alone with the `quick` variant. From d_model 64 on the runs see the ~1M training
characters more than once (d_model 128: about 8 epochs, train loss 1.36 against eval 1.58).

Measured once (2 shared cores of an Intel Xeon, 606 s for the sweep): eval/loss 3.33 at 6k to 1.58 at 393k
parameters; --fit=params gives alpha = 0.190 ± 0.073, E = 0.18 ± 0.82, A = 16.4 ± 6.4 (RMS residual 0.049;
plot: docs/scaling_shakespeare_fit.png). Seven sizes over 1.8 decades pin alpha only roughly and E hardly.
"""

from __future__ import annotations

import importlib.util
import math
import os

import ml_collections

from configs.presets import apply_presets, parse_variant

VARIANTS = ("quick",)
WIDTHS = (16, 24, 32, 48, 64, 96, 128)
NUM_LAYERS = 2
HEAD_DIM = 16
TOKENS_PER_PARAM = 20
BATCH_SIZE = 12
SEQ_LEN = 64


def _shakespeare_char():
    """experiments/shakespeare_char.py as a module (experiments are files, not a package)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shakespeare_char.py")
    spec = importlib.util.spec_from_file_location("_scaling_shakespeare_base", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def non_embedding_params(d_model: int, num_layers: int = NUM_LAYERS) -> int:
    """The blocks' weight matrices: per layer 4 d^2 of attention projections and 8 d^2 of MLP (d_ff = 4 d)."""
    return num_layers * 12 * d_model * d_model


def train_steps(d_model: int, tokens_per_param: float = TOKENS_PER_PARAM) -> int:
    """Optimizer steps that train `d_model`'s model on `tokens_per_param` tokens per non-embedding parameter."""
    return math.ceil(tokens_per_param * non_embedding_params(d_model) / (BATCH_SIZE * SEQ_LEN))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The recipe at depth NUM_LAYERS and a middle width (`quick`: the smallest; `size=` presets apply last); the
    sweep sets the width."""
    variant, presets = parse_variant(arg, "scaling_shakespeare", VARIANTS)
    config = _shakespeare_char().get_config()
    width = WIDTHS[0] if variant == "quick" else WIDTHS[len(WIDTHS) // 2]
    config.model.update(num_layers=NUM_LAYERS, **_width_keys(width))
    config.data.update(seq_len=SEQ_LEN)
    steps = train_steps(width)
    config.train.update(steps=steps, batch_size=BATCH_SIZE, log_every=20, eval_every=0, eval_steps=40,
                        checkpoint_every=0, steps_per_dispatch=20)
    config.optimizer.update(warmup_steps=max(1, steps // 20))
    return apply_presets(config, presets)


def _width_keys(width: int) -> dict[str, int]:
    return {"d_model": width, "num_heads": max(1, width // HEAD_DIM)}


def get_sweep() -> list[dict]:
    """One run per width: its heads, and steps and warmup for TOKENS_PER_PARAM tokens per parameter."""
    runs = []
    for width in WIDTHS:
        steps = train_steps(width)
        runs.append({**{f"model.{key}": value for key, value in _width_keys(width).items()}, "train.steps": steps,
                     "optimizer.warmup_steps": max(1, steps // 20)})
    return runs
