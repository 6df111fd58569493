"""Python API over a work directory: `llm_jax.load(DIR)` gives the run's model, tokenizer and weights with
methods that take plain texts.

    import llm_jax
    model = llm_jax.load("runs/minilm")          # e.g. written by python -m llm_jax.convert --from=hf
    vectors = model.sentence_embeddings(["A man is eating.", "Someone eats food."])   # [2, d_model]

Texts are encoded as transformers' tokenizer(texts, padding=True, truncation=True) encodes them: for
tokenizers with [CLS]/[SEP] (WordPiece), "[CLS] text [SEP]" or, for a (text_a, text_b) pair,
"[CLS] a [SEP] b [SEP]" with token type 1 on b; the plain ids otherwise (decoders). Rows are padded with
the pad id to the longest and cut to model.max_len. The forward is one jitted function on one device, run
over chunks of `chunk_rows` texts.

Shape letters: B texts, T tokens, D model width, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence, Union

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from llm_jax.data import masking
from llm_jax.models.model_config import ModelConfig

Text = Union[str, tuple[str, str]]  # one text, or a sentence pair
CHUNK_ROWS = 64
TOKEN_ID_FAMILIES = ("decoder",)  # families whose `logits` take token ids (causal LMs), not texts


@dataclasses.dataclass(frozen=True)
class EncodedBatch:
    """Padded model inputs: token ids, 1 on real tokens / 0 on padding, token types (0 = text a, 1 = b)."""

    ids_BT: np.ndarray
    mask_BT: np.ndarray
    token_types_BT: np.ndarray


def _select(outputs: Any, mask_BT: jax.Array, what: str) -> jax.Array:
    """The part of the model's outputs a method returns; XLA drops what is not selected."""
    if what == "hidden":
        return outputs.hidden_BTD.astype(jnp.float32)
    if what == "pooled":
        return outputs.pooled_BD.astype(jnp.float32)
    if what == "mean":  # sentence-transformers' mean pooling, then normalize(p=2, eps=1e-12)
        mask_BT1 = mask_BT[:, :, None].astype(jnp.float32)
        sums_BD = jnp.sum(outputs.hidden_BTD.astype(jnp.float32) * mask_BT1, axis=1)
        mean_BD = sums_BD / jnp.maximum(jnp.sum(mask_BT1, axis=1), 1e-9)
        return mean_BD / jnp.maximum(jnp.linalg.norm(mean_BD, axis=-1, keepdims=True), 1e-12)
    return outputs.heads[what]  # a head's output, e.g. "mlm" logits


class LoadedModel:
    """A run's model with its weights: `.config` (the run's ConfigDict), `.model_config`, `.tokenizer`,
    `.params` (device arrays), and methods from texts to numpy arrays."""

    def __init__(self, config: ml_collections.ConfigDict, model_config: ModelConfig, tokenizer: Any, params: Any,
                 model: Any, mesh: Any, rules: Any, chunk_rows: int = CHUNK_ROWS):
        self.config, self.model_config, self.tokenizer, self.params = config, model_config, tokenizer, params
        self.chunk_rows = chunk_rows
        self._model, self._mesh, self._rules = model, mesh, rules
        self._forward = jax.jit(self._forward_chunk, static_argnames="what")

    # ------------------------------------------------------------------------- inputs

    def _special(self, name: str) -> int | None:
        return getattr(self.tokenizer, "special_ids", {}).get(name)

    def _frame(self, text: Text) -> tuple[list[int], list[int]]:
        """(ids, token types) of one text or pair: with [CLS]/[SEP] when the tokenizer has them."""
        a, b = (text, None) if isinstance(text, str) else text
        ids_a = [int(i) for i in self.tokenizer.encode(a)]
        ids_b = None if b is None else [int(i) for i in self.tokenizer.encode(b)]
        cls, sep = self._special("cls"), self._special("sep")
        if cls is None or sep is None:
            ids = (ids_a + (ids_b or []))[:self.model_config.max_len]
            return ids, [0] * len(ids)
        if ids_b is None:
            ids_a = ids_a[:self.model_config.max_len - 2]
            return [cls] + ids_a + [sep], [0] * (len(ids_a) + 2)
        # longest-first, as transformers' tokenizer and the encoder tasks' rows truncate
        ids_a, ids_b = masking.truncate_pair(ids_a, ids_b, self.model_config.max_len - 3)
        return [cls] + ids_a + [sep] + ids_b + [sep], [0] * (len(ids_a) + 2) + [1] * (len(ids_b) + 1)

    def encode(self, texts: Text | Sequence[Text]) -> EncodedBatch:
        """The padded ids, mask and token types of `texts` (a text, a (text_a, text_b) pair, or a list)."""
        texts = [texts] if isinstance(texts, (str, tuple)) else list(texts)
        if not texts:
            raise ValueError("no texts given: pass a string or a non-empty list of strings")
        framed = [self._frame(text) for text in texts]
        length = max(len(ids) for ids, _ in framed)
        pad = self._special("pad") or 0
        ids_BT = np.full((len(texts), length), pad, np.int32)
        mask_BT = np.zeros((len(texts), length), np.int32)
        types_BT = np.zeros((len(texts), length), np.int32)
        for row, (ids, types) in enumerate(framed):
            ids_BT[row, :len(ids)], mask_BT[row, :len(ids)], types_BT[row, :len(ids)] = ids, 1, types
        return EncodedBatch(ids_BT, mask_BT, types_BT)

    # ------------------------------------------------------------------------- forward

    def _forward_chunk(self, params: Any, ids_BT: jax.Array, mask_BT: jax.Array, types_BT: jax.Array,
                       what: str) -> jax.Array:
        # Positions count 0..T-1 over the padding too (as transformers does), so padding rows match it.
        positions_BT = jnp.broadcast_to(jnp.arange(ids_BT.shape[1]), ids_BT.shape)
        token_types_BT = types_BT if self.model_config.type_vocab_size else None
        outputs = self._model.apply({"params": params}, ids_BT, positions_BT, mask_BT, token_types_BT,
                                    deterministic=True)
        return _select(outputs, mask_BT, what)

    def _run(self, texts: Text | Sequence[Text], what: str) -> np.ndarray:
        return self._run_batch(self.encode(texts), what)

    def _run_batch(self, batch: EncodedBatch, what: str) -> np.ndarray:
        import flax.linen as nn

        chunks = []
        with jax.set_mesh(self._mesh), nn.logical_axis_rules(self._rules):
            for start in range(0, len(batch.ids_BT), self.chunk_rows):
                rows = slice(start, start + self.chunk_rows)
                chunks.append(np.asarray(self._forward(self.params, batch.ids_BT[rows], batch.mask_BT[rows],
                                                       batch.token_types_BT[rows], what=what)))
        return np.concatenate(chunks)

    def hidden_states(self, texts: Text | Sequence[Text]) -> np.ndarray:
        """Final hidden states [B, T, D] (float32), padding positions included (see `encode` for the mask)."""
        return self._run(texts, "hidden")

    def pooled(self, texts: Text | Sequence[Text]) -> np.ndarray:
        """The model's pooled output [B, D]: BERT's pooler, tanh(dense(hidden state of [CLS]))."""
        if not self.model_config.pooler:
            raise ValueError(f"this model has no pooler (model.pooler=False, family {self.model_config.family!r}); "
                             "use sentence_embeddings (mean of the hidden states) instead")
        return self._run(texts, "pooled")

    def sentence_embeddings(self, texts: Text | Sequence[Text]) -> np.ndarray:
        """[B, D]: the mean of the hidden states over real tokens, L2-normalised (what sentence-transformers
        returns for all-MiniLM-L6-v2)."""
        return self._run(texts, "mean")

    def logits(self, inputs: Text | Sequence[Text] | Sequence[Sequence[int]] | np.ndarray,
               decoder_input_ids: Sequence[Sequence[int]] | np.ndarray | None = None) -> np.ndarray:
        """[B, T, V] float32 logits over the real vocabulary. Encoders (masked LM head): of texts, encoded as
        `encode` does. Decoders (causal LM head): of token ids, a list of equal-length lists or an int array
        [B, T], every position a real token; position t holds the prediction of token t + 1. Encoder-decoders:
        of encoder ids [B, S] and `decoder_input_ids` [B, T] (the targets shifted right after the start id, the
        pad id), the prediction of each decoder position's next token."""
        if self.model_config.family == "encoder_decoder":
            return self._seq2seq_logits(inputs, decoder_input_ids)
        if self.model_config.family in TOKEN_ID_FAMILIES:
            return self._run_batch(self._id_batch(inputs), "lm")[..., :self.model_config.vocab_size]
        head = next((name for name in ("mlm", "lm") if name in self.model_config.heads), None)
        if head is None:
            raise ValueError(f"this model has no language-model head (heads {list(self.model_config.heads)}); "
                             "logits need an mlm or lm head, e.g. a BertForPreTraining import")
        return self._run(inputs, head)[..., :self.model_config.vocab_size]

    def _seq2seq_logits(self, input_ids: Any, decoder_input_ids: Any) -> np.ndarray:
        import flax.linen as nn

        if decoder_input_ids is None:
            raise ValueError("an encoder-decoder's logits need decoder_input_ids [B, T] besides the encoder's "
                             "input_ids [B, S]: the decoder start id (the pad id, 0) then the targets shifted right")
        encoder, decoder = self._id_batch(input_ids), self._id_batch(decoder_input_ids)
        if len(encoder.ids_BT) != len(decoder.ids_BT):
            raise ValueError(f"{len(encoder.ids_BT)} rows of input_ids but {len(decoder.ids_BT)} of "
                             "decoder_input_ids: give one decoder row per encoder row")
        if not hasattr(self, "_seq2seq_forward"):
            self._seq2seq_forward = jax.jit(lambda p, x, y: self._model.apply({"params": p}, x, y).heads["lm"])
        with jax.set_mesh(self._mesh), nn.logical_axis_rules(self._rules):
            logits = self._seq2seq_forward(self.params, encoder.ids_BT, decoder.ids_BT)
        return np.asarray(logits, np.float32)[..., :self.model_config.vocab_size]

    def _id_batch(self, input_ids: Sequence[Sequence[int]] | np.ndarray) -> EncodedBatch:
        """Token ids [B, T] as a batch without padding; ragged rows, ids outside the vocabulary or rows longer
        than model.max_len are errors that say what to pass."""
        cfg = self.model_config
        try:
            ids_BT = np.asarray(input_ids)
        except ValueError:
            ids_BT = np.asarray(None, dtype=object)  # ragged rows
        if ids_BT.ndim != 2 or ids_BT.size == 0 or not np.issubdtype(ids_BT.dtype, np.integer):
            raise ValueError(f"input_ids must be token ids of shape [B, T] (a list of equal-length lists of ints or an "
                             f"int array; got {type(input_ids).__name__} of shape {ids_BT.shape}, dtype "
                             f"{ids_BT.dtype}); every position is a real token, so run rows of other lengths apart")
        outside = sorted({int(i) for i in ids_BT[(ids_BT < 0) | (ids_BT >= cfg.vocab_size)]})
        if outside:
            raise ValueError(f"input_ids {outside[:10]} are outside the model's vocabulary of {cfg.vocab_size}")
        if ids_BT.shape[1] > cfg.max_len:
            raise ValueError(f"input_ids have {ids_BT.shape[1]} tokens a row; the model takes at most "
                             f"model.max_len={cfg.max_len}")
        ones_BT = np.ones(ids_BT.shape, np.int32)
        return EncodedBatch(ids_BT.astype(np.int32), ones_BT, np.zeros_like(ones_BT))

    # ------------------------------------------------------------------------- decoding (causal LMs)

    def _engine(self) -> Any:
        from llm_jax.decoding import text

        if not hasattr(self, "_decoding_engine"):
            self._decoding_engine = text.engine_for(self.model_config, self.tokenizer)
        return self._decoding_engine

    def generate(self, prompts: str | Sequence[str], *, max_new_tokens: int = 200, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, beam_size: int = 1, length_penalty: float = 0.0,
                 seed: int = 0) -> str | list[str]:
        """The continuation (without the prompt) of a prompt, or of each prompt of a list, by the KV-cache engine
        (llm_jax.decoding.engine): greedy (temperature 0), sampling, or beam search (beam_size > 1)."""
        import flax.linen as nn
        from llm_jax.decoding import text
        from llm_jax.decoding.engine import DecodeOptions

        options = DecodeOptions(max_new_tokens, temperature, top_k, top_p, beam_size, length_penalty, seed).check()
        single = isinstance(prompts, str)
        prompt_list = [prompts] if single else list(prompts)
        engine = self._engine()
        prompts_ids = text.encode_prompts(self.tokenizer, prompt_list)
        with jax.set_mesh(self._mesh), nn.logical_axis_rules(self._rules):
            completions = text.generate_texts(engine, self.params, self.tokenizer, prompts_ids, options)
        return completions[0] if single else completions

    def score(self, prompts: str | Sequence[str], continuations: str | Sequence[str]) -> np.ndarray | list[np.ndarray]:
        """log p of each token of each continuation given its prompt (float32 arrays, one per pair; the
        continuation's log-likelihood is their sum), from one forward pass per batch."""
        import flax.linen as nn
        from llm_jax.decoding import text

        single = isinstance(prompts, str)
        prompt_list = [prompts] if single else list(prompts)
        continuation_list = [continuations] if isinstance(continuations, str) else list(continuations)
        with jax.set_mesh(self._mesh), nn.logical_axis_rules(self._rules):
            scores = text.score_texts(self._engine(), self.params, self.tokenizer, prompt_list, continuation_list)
        return scores[0] if single else scores


def load(workdir: str) -> LoadedModel:
    """The model of a work directory (a training run, or an import by llm_jax.convert) at its latest
    checkpoint, on the first device."""
    from llm_jax.training.run import build_run, restore_latest_params
    from llm_jax.training.run_record import read_run_config

    config, model_config = read_run_config(workdir)
    config.mesh.update(data=1, fsdp=1, tensor=1)
    run = build_run(config, workdir, devices=jax.devices()[:1], saved_model_config=model_config, with_data=False)
    _, params = restore_latest_params(run)
    return LoadedModel(run.config, run.model_config, run.tokenizer, params, run.model, run.mesh, run.rules)
