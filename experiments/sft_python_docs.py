"""Supervised fine-tuning: the python_docs GPT taught to answer questions about Python, loss on the answers only.

The pairs are data.source=python_docs_qa (`llm_jax.data.pairs`): for every titled section of Python's help
topics, 'Q: Tell me about <title>.\\nA:' -> the section's first paragraph (158 pairs, the last 10% held out),
offline like python_docs. The run starts from the weights and the tokenizer of the python_docs pretraining run
(train.init_from and data.tokenizer_path, both under runs/python_docs: train that first), packs whole pairs
into rows (first_fit) and trains on the response tokens and their EOS only (data.objective=sft):

    python -m llm_jax.train --config=experiments/python_docs.py --workdir=runs/python_docs
    python -m llm_jax.train --config=experiments/sft_python_docs.py --workdir=runs/sft_python_docs
    python -m llm_jax.generate --workdir=runs/sft_python_docs --temperature=0 \\
        --prompt="$(printf 'Q: Tell me about the "with" statement.\\nA:')"

Another pretraining run: --config.train.init_from=DIR --config.data.tokenizer_path=DIR/tokenizer/spm.model.
Variants: `:quick` (tests, seconds): the python_docs:quick model from scratch (a tokenizer trained on the pairs);
chain it from a python_docs:quick run with the two keys above.
"""

from __future__ import annotations

import os

import ml_collections

from configs.presets import apply_presets, parse_variant
from experiments import python_docs

VARIANTS = ("quick",)
PRETRAINED = "runs/python_docs"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant, presets = parse_variant(arg, "sft_python_docs", VARIANTS)
    config = python_docs.get_config(variant)  # the same model as the pretraining run, so its weights load
    config.data.update(source="python_docs_qa", objective="sft", packing="first_fit", packing_bins=8)
    # roughly 20 passes over the 142 train pairs: the held-out answers' loss is lowest near step 20 and rises
    # slowly after (docs/results.md); 100 steps learn the answer's form and the EOS
    config.train.update(init_from=PRETRAINED, steps=100, batch_size=16, log_every=20, eval_every=20,
                        eval_steps=-1, checkpoint_every=100, steps_per_dispatch=10)
    config.data.tokenizer_path = os.path.join(PRETRAINED, "tokenizer", "spm.model")
    config.optimizer.update(learning_rate=5e-4, warmup_steps=20, min_learning_rate=5e-5)
    if variant == "quick":
        config.model.max_len = 128  # rope: the same parameters as python_docs:quick; few pairs cut at 512 pieces
        config.data.update(tokenizer_path="", seq_len=128)
        config.train.update(init_from="", steps=20, batch_size=4, log_every=5, eval_every=0, eval_steps=2,
                            checkpoint_every=0, steps_per_dispatch=5)
        config.optimizer.update(learning_rate=2e-3, warmup_steps=2)
    return apply_presets(config, presets)
