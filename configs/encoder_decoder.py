"""Encoder-decoder styles (model.family=encoder_decoder): the architecture keys of T5 and of the original
Transformer, applied by the T5 experiments and by `--config=EXP.py:transformer`-style presets.

    apply_encoder_decoder(config, "t5", "nano")
"""

from __future__ import annotations

import ml_collections

from configs.model_sizes import apply_model_size
from llm_jax.registry import Registry

ENCODER_DECODER_STYLES: Registry[dict] = Registry("encoder-decoder style")
# T5 (Raffel et al. 2020): relative position buckets shared by a stack's layers, pre-LN RMSNorm, no biases,
# unscaled attention logits, ReLU MLP, one tied embedding. T5 v1.0 also initialises that embedding at stddev 1 and
# scales the decoder output by d_model**-0.5 before the tied head (model.embedding_init_std=1.0,
# model.scale_decoder_outputs=True; imports of its checkpoints set both). Trained from scratch with every
# matrix at model.init_std, that pair starves the encoder: its gradient at initialisation was ~350x smaller than
# the decoder's (against ~5x without it), and SST-2 fine-tuning never read the input. So the style leaves both off.
ENCODER_DECODER_STYLES.add("t5", dict(family="encoder_decoder", positional="t5_relative_bias", norm="rmsnorm",
                                      norm_position="pre", norm_eps=1e-6, use_bias=False, mlp="relu",
                                      scale_attention_logits=False, tie_embeddings=True))
# T5 v1.1: gated GELU (tanh approximation, transformers' "gelu_new") and an untied LM head
ENCODER_DECODER_STYLES.add("t5_v1_1", {**ENCODER_DECODER_STYLES.get("t5"), "mlp": "gated",
                                       "activation": "gelu_tanh", "tie_embeddings": False,
                                       "scale_decoder_outputs": False})
# "Attention Is All You Need": sinusoidal positions, post-LN LayerNorm with biases, ReLU, embeddings scaled by
# sqrt(d_model), one embedding for the encoder, the decoder and the output projection
ENCODER_DECODER_STYLES.add("transformer", dict(family="encoder_decoder", positional="sinusoidal", norm="layernorm",
                                               norm_position="post", use_bias=True, mlp="relu",
                                               scale_embeddings=True, tie_embeddings=True))


def apply_encoder_decoder(config: ml_collections.ConfigDict, style: str, size: str) -> ml_collections.ConfigDict:
    """model.* of the style, then the size (configs.model_sizes); num_decoder_layers follows num_layers."""
    config.model.update(**ENCODER_DECODER_STYLES.get(style))
    return apply_model_size(config, size)
