"""SST-2 as text-to-text: the span-corruption model of experiments/t5_wikitext2.py fine-tuned to write
"positive" or "negative" after "sst2 sentence: <sentence>" (data.objective=seq2seq on the labelled TSV files).

    python -m llm_jax.train --config=experiments/t5_wikitext2.py --workdir=runs/t5_wikitext2
    python -m llm_jax.train --config=experiments/t5_sst2.py --workdir=runs/t5_sst2
    python -m llm_jax.evaluate --workdir=runs/t5_sst2 --split=test --eval_steps=-1
    python -m llm_jax.generate --workdir=runs/t5_sst2 --temperature=0 --prompt="sst2 sentence: a gorgeous film"

Trains on sst2_train.tsv, tunes on sst2_dev.tsv (the validation split) and reports sst2_test.tsv (GLUE's dev
split, the number papers report) once, at the end, with evaluate --split=test. eval/accuracy is the share of
sentences whose label word greedy decoding writes exactly (eval/exact_match; llm_jax/tasks/seq2seq.py).
The weights and the tokenizer come from runs/t5_wikitext2 (train.init_from, data.tokenizer_path).
Variants: `:quick` (tests: from scratch, a tokenizer trained on the sentences).
"""

from __future__ import annotations

import os

import ml_collections

from configs.presets import apply_presets, parse_variant
from experiments import t5_wikitext2

VARIANTS = ("quick",)
PRETRAINED = "runs/t5_wikitext2"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant, presets = parse_variant(arg, "t5_sst2", VARIANTS)
    config = t5_wikitext2.get_config(variant)  # the pretraining model, so its weights load
    data_dir = t5_wikitext2.DATA_DIR
    config.data.update(source="tsv", objective="seq2seq", text_columns=("sentence",), label_column="label",
                       labels=("0", "1"), target_labels=("negative", "positive"), input_prefix="sst2 sentence: ",
                       path=os.path.join(data_dir, "sst2_train.tsv"), eval_path=os.path.join(data_dir, "sst2_dev.tsv"),
                       eval_split="validation", test_path=os.path.join(data_dir, "sst2_test.tsv"),
                       tokenizer_path=os.path.join(PRETRAINED, "tokenizer", "spm.model"), seq_len=64,
                       targets_seq_len=16)
    config.train.update(init_from=PRETRAINED, steps=1000, batch_size=32, log_every=50, eval_every=250,
                        eval_steps=-1, checkpoint_every=1000, steps_per_dispatch=10)
    config.optimizer.update(learning_rate=1e-3, warmup_steps=50, min_learning_rate=5e-5)
    if variant == "quick":
        config.data.update(tokenizer_path="", seq_len=32, targets_seq_len=8)
        config.train.update(init_from="", steps=10, batch_size=8, eval_every=0, eval_steps=2, checkpoint_every=0)
    return apply_presets(config, presets)
