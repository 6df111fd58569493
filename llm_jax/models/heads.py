"""Output heads, selected by the task (`ModelConfig.heads`): each reads the stack's named outputs.

A head is a module class built as `HEAD(config, name=PARAM_NAME)` and called as
`head(hidden_BTD, pooled_BD, embedding, deterministic)`; `embedding` is the token embedding, for heads tied
to it. Token-level vocabulary heads (lm, mlm) read only `prediction_positions_BP` when the task gives them
(BERT predicts the ~15% masked positions: the [B, P, V] logits cost a fraction of [B, T, V]). Parameter names (the registry's `param_name`) are the top-level keys `training.optimizer.HEAD_PARAMS`
lists, so freezing and `train.init_from` know what a head is.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_jax.models.embeddings import TokenEmbedding, mask_padded_vocab
from llm_jax.models.mlp import ACTIVATIONS
from llm_jax.models.model_config import ModelConfig
from llm_jax.models.norms import NORMS
from llm_jax.registry import Registry


@dataclasses.dataclass(frozen=True)
class HeadSpec:
    module: type[nn.Module]
    param_name: str  # the top-level parameter key the head owns


HEADS: Registry[HeadSpec] = Registry("head")


def _dense(cfg: ModelConfig, features: int, axes: tuple[str | None, str | None], name: str,
           use_bias: bool = True) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name,
                    kernel_init=nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), axes),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]))


def linear(module: nn.Module, cfg: ModelConfig, x: jax.Array, features: int,
           kernel_axes: tuple[str | None, str | None] = ("embed", None)) -> jax.Array:
    """x @ kernel + bias with "kernel" and "bias" created directly on `module` (head/kernel, head/bias, as
    BERT checkpoints name them); call from the module's compact method. Float32 output."""
    kernel = module.param("kernel", nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), kernel_axes),
                          (x.shape[-1], features), cfg.param_dtype)
    bias = module.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, kernel_axes[1:]), (features,),
                        cfg.param_dtype)
    return (jnp.dot(x, kernel.astype(cfg.dtype)) + bias.astype(cfg.dtype)).astype(jnp.float32)


class LMHead(nn.Module):
    """Next-token logits over the padded vocabulary (tied to the embedding or its own projection), float32,
    padding rows masked to the dtype minimum."""

    config: ModelConfig

    @nn.compact
    def __call__(self, hidden_BTD, pooled_BD, embedding: TokenEmbedding, deterministic: bool) -> jax.Array:
        cfg = self.config
        if cfg.tie_embeddings:
            logits_BTV = embedding.attend(hidden_BTD)
        else:
            logits_BTV = _dense(cfg, cfg.padded_vocab_size, ("embed", "vocab"), "dense", cfg.use_bias)(hidden_BTD)
        logits_BTV = nn.with_logical_constraint(logits_BTV, ("batch", "seq", "act_vocab"))
        return mask_padded_vocab(logits_BTV.astype(jnp.float32), cfg.vocab_size)


class MLMHead(nn.Module):
    """BERT's masked-LM head: dense + activation + norm, then the tied embedding plus an output bias."""

    config: ModelConfig

    @nn.compact
    def __call__(self, hidden_BTD, pooled_BD, embedding: TokenEmbedding, deterministic: bool) -> jax.Array:
        cfg = self.config
        h_BTD = _dense(cfg, cfg.d_model, ("embed", None), "transform")(hidden_BTD)
        h_BTD = NORMS.get(cfg.norm)(cfg, name="transform_norm")(ACTIVATIONS.get(cfg.activation)(h_BTD))
        bias_V = self.param("output_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
                            (cfg.padded_vocab_size,), cfg.param_dtype)
        logits_BTV = embedding.attend(h_BTD) + bias_V.astype(cfg.dtype)
        logits_BTV = nn.with_logical_constraint(logits_BTV, ("batch", "seq", "act_vocab"))
        return mask_padded_vocab(logits_BTV.astype(jnp.float32), cfg.vocab_size)


class SentencePairHead(nn.Module):
    """Two-way logits from the pooled output: next-sentence (BERT) or sentence-order (ALBERT) prediction."""

    config: ModelConfig

    @nn.compact
    def __call__(self, hidden_BTD, pooled_BD, embedding, deterministic: bool) -> jax.Array:
        return linear(self, self.config, pooled_BD, 2)


class SequenceClassifier(nn.Module):
    """num_labels logits from the pooled output (dropout first, as BERT fine-tuning does); per token from the
    hidden states in the token classifier (the CRF's emissions when model.crf)."""

    config: ModelConfig
    per_token = False

    @nn.compact
    def __call__(self, hidden_BTD, pooled_BD, embedding, deterministic: bool) -> jax.Array:
        cfg = self.config
        x = nn.Dropout(cfg.dropout)(hidden_BTD if self.per_token else pooled_BD, deterministic=deterministic)
        return linear(self, cfg, x, cfg.num_labels)


class TokenClassifier(SequenceClassifier):
    """num_labels logits per token."""

    per_token = True


class CRFTransitions(nn.Module):
    """The CRF's label-transition, start and end scores (zeros at init); the task's loss and decoding read
    them from the outputs (`models.crf` holds the forward algorithm and Viterbi)."""

    config: ModelConfig

    @nn.compact
    def __call__(self) -> dict[str, jax.Array]:
        cfg, num_labels = self.config, self.config.num_labels
        zeros = nn.initializers.zeros
        return {"transitions": self.param("transitions", nn.with_logical_partitioning(zeros, (None, None)),
                                          (num_labels, num_labels), cfg.param_dtype).astype(jnp.float32),
                "start": self.param("start", nn.with_logical_partitioning(zeros, (None,)), (num_labels,),
                                    cfg.param_dtype).astype(jnp.float32),
                "end": self.param("end", nn.with_logical_partitioning(zeros, (None,)), (num_labels,),
                                  cfg.param_dtype).astype(jnp.float32)}


HEADS.add("lm", HeadSpec(LMHead, "output_head"))
HEADS.add("mlm", HeadSpec(MLMHead, "mlm_head"))
HEADS.add("nsp", HeadSpec(SentencePairHead, "nsp_head"))
HEADS.add("classifier", HeadSpec(SequenceClassifier, "classifier"))
HEADS.add("token_classifier", HeadSpec(TokenClassifier, "token_classifier"))


TOKEN_VOCAB_HEADS = ("lm", "mlm")


def apply_heads(cfg: ModelConfig, hidden_BTD: jax.Array, pooled_BD: jax.Array | None, embedding: TokenEmbedding,
                deterministic: bool, prediction_positions_BP: jax.Array | None = None) -> dict[str, jax.Array]:
    """Each of the config's heads on the stack's outputs (call inside the family's compact method). With
    model.crf the token classifier's CRF parameters are created too (the task calls its methods)."""
    outputs = {}
    for name in cfg.heads:
        spec = HEADS.get(name)
        hidden = hidden_BTD
        if prediction_positions_BP is not None and name in TOKEN_VOCAB_HEADS:
            hidden = jnp.take_along_axis(hidden_BTD, prediction_positions_BP[..., None], axis=1)
        outputs[name] = spec.module(cfg, name=spec.param_name)(hidden, pooled_BD, embedding, deterministic)
    if cfg.crf and "token_classifier" in cfg.heads:
        outputs["crf"] = CRFTransitions(cfg, name="crf")()
    return outputs
