"""The decoding engine: a KV cache, then greedy decoding, sampling (temperature, top-k, top-p), beam search
and scoring over it, for any family whose model takes (tokens_BT, positions_BT) and returns an "lm" head.

Cache design: Flax's mutable "cache" collection, not an explicit cache argument. The cache is still a pytree
that goes in and out of pure functions (`model.apply({"params", "cache"}, ..., mutable=["cache"])` returns the
new cache), so jit, donation and beam reordering treat it as data; but no signature between the model's entry
and its attention layers changes, so the training program is untouched, and `nn.scan` stacks the cache on the
layers axis (model.scan_layers) as it stacks the parameters. An encoder-decoder adds its cross-attention keys
to the same collection.

Batches are right-padded: row b's prompt fills positions 0..P_b-1, and its new tokens take positions P_b,
P_b+1, ...; position == cache slot, and a query reads the slots at or before its position. So every positional
scheme (learned, sinusoidal, rope, alibi) sees exactly the positions of an unpadded row, and rows of different
lengths decode in lock-step. A row stops at EOS (when the tokenizer has one) or after max_new_tokens.

Context longer than model.max_len: sampling slides a window. When prompt + new tokens do not fit, the window
keeps the last `max_len - min(new tokens left, max_len // 2)` tokens, re-fills the cache from them (one prefill)
and decodes until the window is full, then slides again (the prompt itself is cut to its last tokens the same
way; callers report it). Beam search decodes in one window: its prompts are cut to max_len - max_new_tokens.

Beam search ranks hypotheses by sum(log p) / lp(length), lp = ((5 + length) / 6) ** alpha (GNMT, Wu et al.
2016; alpha = `length_penalty`, 0 = raw log-likelihood); `length` counts new tokens up to and including EOS.

The jitted functions are built once per (strategy, options) and kept in `Engine`; jax.jit keeps one executable
per input shape (batch, prompt bucket of 16, cache bucket of 128), so a call never re-traces a shape seen
before.

Encoder-decoder models (llm_jax/decoding/encoder_decoder.py) reuse every strategy: their prefill encodes the
prompts and feeds the decoder start token, caching each layer's cross-attention keys/values.

Shape letters: B rows, W beams, P prompt bucket, S cache slots, N new tokens, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.decoding.options import DecodeOptions
from llm_jax.decoding.sampling import filter_logits
from llm_jax.errors import ConfigError
from llm_jax.models import layer_layout
from llm_jax.models.attention_masks import uses_prefix
from llm_jax.registry import Registry

PROMPT_BUCKET, CACHE_BUCKET = 16, 128
MAX_ROWS = 64  # prompts decoded together; more are decoded in batches of this many


def program_options(options: DecodeOptions) -> DecodeOptions:
    """The options a jitted program depends on; the others are reset so that they share one program."""
    if options.strategy == "beam":
        return DecodeOptions(0, 0.0, 0, 1.0, options.beam_size, options.length_penalty, 0)
    if options.strategy == "greedy":
        return DecodeOptions(0, 0.0, 0, 1.0, 1, 0.0, 0)
    return DecodeOptions(0, options.temperature, options.top_k, options.top_p, 1, 0.0, 0)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def right_pad(rows: Sequence[Sequence[int]], width: int, pad: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """ids_BP (right-padded with `pad`) and lengths_B."""
    ids_BP = np.full((len(rows), width), pad, np.int32)
    for b, row in enumerate(rows):
        ids_BP[b, :len(row)] = row
    return ids_BP, np.array([len(row) for row in rows], np.int32)


# ----------------------------------------------------------------------------- token choice


# (logits_BV over the real vocabulary, key, options) -> token_B
TokenChoice = Callable[[jax.Array, jax.Array, DecodeOptions], jax.Array]
TOKEN_CHOICES: Registry[TokenChoice] = Registry("token choice")


@TOKEN_CHOICES.register("greedy")
def choose_greedy(logits_BV: jax.Array, key: jax.Array, options: DecodeOptions) -> jax.Array:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)


@TOKEN_CHOICES.register("sample")
def choose_sample(logits_BV: jax.Array, key: jax.Array, options: DecodeOptions) -> jax.Array:
    """A draw from softmax(logits / temperature) restricted to the top-k / top-p set of each row."""
    filtered_BV = jax.vmap(lambda l_V: filter_logits(l_V, options.top_k, options.top_p))(
        logits_BV / options.temperature)
    return jax.random.categorical(key, filtered_BV, axis=-1).astype(jnp.int32)


# ----------------------------------------------------------------------------- the engine


class Engine:
    """Prefill, decode steps and the decoding strategies for one model; `model` is built from
    `model_config.replace(remat="none")` (decoding has no backward pass)."""

    def __init__(self, model: nn.Module, vocab_size: int, max_len: int, *, eos_id: int | None = None,
                 pad_id: int = 0):
        self.model, self.vocab_size, self.max_len = model, vocab_size, max_len
        self.eos_id, self.pad_id = eos_id, pad_id
        self._compiled: dict[tuple, Callable] = {}

    # ------------------------------------------------------------------------- model calls (traced)

    def forward(self, params: Any, cache: Any, tokens_BT: jax.Array, positions_BT: jax.Array,
                **model_kwargs: jax.Array) -> tuple[jax.Array, Any]:
        """(float32 logits_BTV over the real vocabulary, new cache): one call of the model in cache mode;
        `model_kwargs`: a prefix LM's prefix_BT during prefill."""
        outputs, variables = self.model.apply({"params": params, "cache": cache}, tokens_BT, positions_BT,
                                              mutable=["cache"], **model_kwargs)
        return outputs.heads["lm"][..., :self.vocab_size].astype(jnp.float32), variables["cache"]

    def empty_cache(self, params: Any, batch: int, slots: int) -> Any:
        """A zero cache of `slots` key/value slots per row (shapes from tracing the model once, no compute)."""
        tokens_BS = jnp.zeros((batch, slots), jnp.int32)
        shapes = jax.eval_shape(lambda p: self.model.apply({"params": p}, tokens_BS, mutable=["cache"])[1]["cache"],
                                params)
        return jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), shapes)

    def prefill(self, params: Any, tokens_BP: jax.Array, lengths_B: jax.Array, slots: int) -> tuple[jax.Array, Any]:
        """Fills a new cache of `slots` slots from right-padded prompts; returns the logits_BV after each
        prompt's last token and the cache. A prefix LM (model.attention_mask=prefix_lm) reads each prompt
        (positions < its length) as its prefix, bidirectionally."""
        B, P = tokens_BP.shape
        positions_BP = jnp.broadcast_to(jnp.arange(P), (B, P))
        prefix = {"prefix_BT": positions_BP < lengths_B[:, None]} if uses_prefix(self.model.config) else {}
        logits_BPV, cache = self.forward(params, self.empty_cache(params, B, slots), tokens_BP, positions_BP,
                                         **prefix)
        last_B11 = (lengths_B - 1)[:, None, None]
        return jnp.take_along_axis(logits_BPV, last_B11, axis=1)[:, 0], cache

    def decode_step(self, params: Any, cache: Any, tokens_B: jax.Array,
                    positions_B: jax.Array) -> tuple[jax.Array, Any]:
        """Feeds one token per row at its position: (logits_BV of the next token, cache)."""
        logits_B1V, cache = self.forward(params, cache, tokens_B[:, None], positions_B[:, None])
        return logits_B1V[:, 0], cache

    # ------------------------------------------------------------------------- jitted programs

    # ------------------------------------------------------------------------- what differs per family

    def decoded_lengths(self, lengths_B: jax.Array) -> jax.Array:
        """Tokens the decoder has seen after prefill: the prompts themselves (a decoder-only model)."""
        return lengths_B

    def cache_slots(self, longest: int, steps: int) -> int:
        return min(_round_up(longest + steps, CACHE_BUCKET), self.max_len)

    def prompt_width(self, longest: int, slots: int) -> int:
        return min(_round_up(longest, PROMPT_BUCKET), slots)

    def compiled(self, name: str, options: DecodeOptions, build: Callable[[], Callable]) -> Callable:
        """The jitted program `name` for these options, built on first use. The key holds only the options the
        program is traced with (not the seed or the number of tokens, which are arguments); shapes are jit's
        own cache keys."""
        key = (name, program_options(options))
        if key not in self._compiled:
            self._compiled[key] = build()
        return self._compiled[key]

    def _window_program(self, options: DecodeOptions) -> Callable:
        """jit(params, tokens_BP, lengths_B, done_B, steps, key, slots) -> (tokens_BN, done_B): prefill, then
        decode up to `steps` tokens per row (N = slots buffer) until every row is done."""
        choose = TOKEN_CHOICES.get(options.strategy)
        eos = -1 if self.eos_id is None else self.eos_id

        def program(params, tokens_BP, lengths_B, done_B, steps, key, slots):
            logits_BV, cache = self.prefill(params, tokens_BP, lengths_B, slots)
            B = tokens_BP.shape[0]

            def pick(i, logits_BV, done_B):
                token_B = jnp.where(done_B, self.pad_id, choose(logits_BV, jax.random.fold_in(key, i), options))
                return token_B, done_B | (token_B == eos)

            token_B, done_B = pick(0, logits_BV, done_B)
            out_BN = jnp.full((B, slots), self.pad_id, jnp.int32).at[:, 0].set(token_B)

            def body(state):
                i, cache, token_B, done_B, out_BN = state
                positions_B = jnp.minimum(self.decoded_lengths(lengths_B) + i - 1, slots - 1)
                logits_BV, cache = self.decode_step(params, cache, token_B, positions_B)
                token_B, new_done_B = pick(i, logits_BV, done_B)
                return i + 1, cache, token_B, new_done_B, out_BN.at[:, i].set(token_B)

            def cond(state):
                return (state[0] < steps) & ~jnp.all(state[3])

            state = jax.lax.while_loop(cond, body, (jnp.int32(1), cache, token_B, done_B, out_BN))
            return state[4], state[3]

        return jax.jit(program, static_argnames="slots")

    # ------------------------------------------------------------------------- strategies (host side)

    def window(self, new_left: int, longest: int, beam: bool = False) -> tuple[int, int]:
        """(tokens of context to keep, new tokens this window) for a window of at most max_len positions."""
        if longest + new_left <= self.max_len:
            return longest, new_left
        if beam:
            if new_left >= self.max_len:
                raise ConfigError(f"--max_new_tokens={new_left} with --beam_size > 1 must be below model.max_len="
                                  f"{self.max_len}: beam search decodes in one window")
            return self.max_len - new_left, new_left
        room = min(new_left, self.max_len // 2)
        return self.max_len - room, room

    def sample(self, params: Any, prompts: Sequence[Sequence[int]], options: DecodeOptions) -> list[list[int]]:
        """New tokens of each prompt (greedy or sampled; EOS included when it ends a row), sliding the window
        past max_len."""
        _check_prompts(prompts)
        program = self.compiled("window", options, lambda: self._window_program(options))
        rows = [list(p) for p in prompts]
        done_B = np.zeros(len(rows), bool)
        generated = [[] for _ in rows]
        new_left, window = options.max_new_tokens, 0
        base_key = jax.random.key(options.seed)
        while new_left > 0 and not done_B.all():
            keep, steps = self.window(new_left, max(len(r) for r in rows))
            contexts = [r[-keep:] for r in rows]
            longest = max(len(c) for c in contexts)
            slots = self.cache_slots(longest, steps)
            tokens_BP, lengths_B = right_pad(contexts, self.prompt_width(longest, slots), self.pad_id)
            out_BN, new_done_B = program(params, tokens_BP, lengths_B, done_B, np.int32(steps),
                                         jax.random.fold_in(base_key, window), slots=slots)
            out_BN = np.asarray(out_BN)
            for b in np.flatnonzero(~done_B):
                tokens = out_BN[b, :steps].tolist()
                if self.eos_id is not None and self.eos_id in tokens:
                    tokens = tokens[:tokens.index(self.eos_id) + 1]
                generated[b] += tokens
                rows[b] += tokens
            done_B = np.asarray(new_done_B).copy()
            new_left, window = new_left - steps, window + 1
        return generated

    def beam_search(self, params: Any, prompts: Sequence[Sequence[int]],
                    options: DecodeOptions) -> tuple[list[list[int]], np.ndarray]:
        """The best hypothesis per prompt under the GNMT length penalty, and its sum of log-probabilities."""
        _check_prompts(prompts)
        keep, steps = self.window(options.max_new_tokens, max(len(p) for p in prompts), beam=True)
        contexts = [list(p)[-keep:] for p in prompts]
        longest = max(len(c) for c in contexts)
        slots = self.cache_slots(longest, steps)
        tokens_BP, lengths_B = right_pad(contexts, self.prompt_width(longest, slots), self.pad_id)
        program = self.compiled("beam", options, lambda: beam_program(self, options))
        tokens_BN, scores_B = program(params, tokens_BP, lengths_B, steps=steps, slots=slots)
        tokens_BN = np.asarray(tokens_BN)
        results = []
        for row in tokens_BN:
            tokens = row.tolist()
            if self.eos_id is not None and self.eos_id in tokens:
                tokens = tokens[:tokens.index(self.eos_id) + 1]
            results.append(tokens)
        return results, np.asarray(scores_B)

    def generate(self, params: Any, prompts: Sequence[Sequence[int]], options: DecodeOptions,
                 max_rows: int = MAX_ROWS) -> list[list[int]]:
        """New tokens of each prompt by the strategy the options select (STRATEGIES), `max_rows` prompts at a
        time (batch c samples with the seed's key folded with c, so a prompt's sample depends on its batch)."""
        _check_prompts(prompts)
        strategy, options = STRATEGIES.get(options.strategy), options.check()
        results = []
        for chunk, start in enumerate(range(0, len(prompts), max_rows)):
            chunk_options = options if chunk == 0 else dataclasses.replace(
                options, seed=(options.seed * 1_000_003 + chunk) % 2 ** 31)
            results += strategy(self, params, prompts[start:start + max_rows], chunk_options)
        return results

    def check_scoring(self, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]) -> None:
        """One non-empty prompt per continuation, each continuation 1 to max_len - 1 tokens."""
        _check_prompts(prompts)
        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations: give one each")
        for continuation in continuations:
            if not continuation or len(continuation) >= self.max_len:
                raise ValueError(f"a continuation of {len(continuation)} tokens cannot be scored: give 1 to "
                                 f"{self.max_len - 1} tokens (model.max_len={self.max_len})")

    def score(self, params: Any, prompts: Sequence[Sequence[int]],
              continuations: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """log p(continuation token | prompt, earlier continuation tokens) per token, one forward pass per
        batch (no cache); prompts are cut to their last tokens so that prompt + continuation fit max_len."""
        self.check_scoring(prompts, continuations)
        rows, starts = [], []
        for prompt, continuation in zip(prompts, continuations):
            prompt = list(prompt)[-(self.max_len - len(continuation)):]
            rows.append(prompt + list(continuation))
            starts.append(len(prompt))
        width = min(_round_up(max(len(r) for r in rows), PROMPT_BUCKET), self.max_len)
        tokens_BT, lengths_B = right_pad(rows, width, self.pad_id)
        program = self.compiled("score", DecodeOptions(), lambda: score_program(self))
        logp_BT = np.asarray(program(params, tokens_BT))
        return [logp_BT[b, start - 1:length - 1] for b, (start, length) in enumerate(zip(starts, lengths_B))]


def _check_prompts(prompts: Sequence[Sequence[int]]) -> None:
    if not len(prompts):
        raise ValueError("no prompts given: pass at least one prompt")
    for i, prompt in enumerate(prompts):
        if not len(prompt):
            raise ValueError(f"prompt {i} encodes to no tokens: give text that the tokenizer encodes to 1+ tokens")


# (engine, params, prompts, checked options) -> new tokens per prompt
Strategy = Callable[[Engine, Any, Sequence[Sequence[int]], DecodeOptions], list[list[int]]]
STRATEGIES: Registry[Strategy] = Registry("decoding strategy")
STRATEGIES.add("greedy", Engine.sample)
STRATEGIES.add("sample", Engine.sample)
STRATEGIES.add("beam", lambda engine, params, prompts, options: engine.beam_search(params, prompts, options)[0])


def build_engine(model_config: Any, *, eos_id: int | None = None, pad_id: int = 0) -> Engine:
    """An engine for a family built from `model_config` (its decoding variant: no remat)."""
    from llm_jax.decoding.encoder_decoder import EncoderDecoderEngine
    from llm_jax.models.families import build_model

    engines = {"decoder": Engine, "encoder_decoder": EncoderDecoderEngine}
    if "lm" not in model_config.heads or model_config.family not in engines:
        raise ValueError(f"a {model_config.family} model without a language-model head cannot generate: "
                         f"decoding needs model.family in {sorted(engines)} trained with a language-model head")
    model = build_model(model_config.replace(remat="none"))
    return engines[model_config.family](model, model_config.vocab_size, model_config.max_len, eos_id=eos_id,
                                        pad_id=pad_id)


# ----------------------------------------------------------------------------- beam search and scoring programs


def length_penalty(length: jax.Array, alpha: float) -> jax.Array:
    """GNMT's lp = ((5 + length) / 6) ** alpha; hypotheses rank by log-likelihood / lp."""
    return ((5.0 + length.astype(jnp.float32)) / 6.0) ** alpha


def reorder_rows(cache: Any, rows_X: jax.Array) -> Any:
    """The cache with its batch rows taken in the order `rows_X`: axis 1 for the leaves of a scanned stack
    (stacked on a leading layers axis, model.scan_layers), axis 0 for the others."""
    def take(path: tuple, leaf: jax.Array) -> jax.Array:
        stacked = any(getattr(entry, "key", None) == layer_layout.SCANNED for entry in path)
        return jnp.take(leaf, rows_X, axis=1 if stacked else 0)

    return jax.tree_util.tree_map_with_path(take, cache)


def beam_program(engine: Engine, options: DecodeOptions) -> Callable:
    """jit(params, tokens_BP, lengths_B, steps, slots) -> (best tokens_BN, their log-likelihood_B).

    W beams per row share one cache of B*W rows. Beam 0 starts alive and the others at -inf, so the first step
    does not pick the same token W times. A finished beam (EOS) has one continuation, pad at log p 0, so it keeps
    its score and length and competes with the live ones every step."""
    W, alpha, eos = options.beam_size, options.length_penalty, -1 if engine.eos_id is None else engine.eos_id

    def program(params, tokens_BP, lengths_B, steps, slots):
        B = tokens_BP.shape[0]
        lengths_X = jnp.repeat(lengths_B, W)  # X = B * W rows, beam-major within a row
        logits_XV, cache = engine.prefill(params, jnp.repeat(tokens_BP, W, axis=0), lengths_X, slots)
        V = logits_XV.shape[-1]
        stay_V = jnp.full((V,), -jnp.inf).at[engine.pad_id].set(0.0)

        def body(i, state):
            logits_XV, cache, scores_BW, length_BW, finished_BW, seqs_BWN = state
            logp_BWV = jax.nn.log_softmax(logits_XV).reshape(B, W, V)
            logp_BWV = jnp.where(finished_BW[..., None], stay_V, logp_BWV)
            total_BWV = scores_BW[..., None] + logp_BWV
            new_length_BW = length_BW + (~finished_BW)
            rank_BWV = total_BWV / length_penalty(new_length_BW, alpha)[..., None]
            _, flat_BW = jax.lax.top_k(rank_BWV.reshape(B, W * V), W)
            parent_BW, token_BW = flat_BW // V, (flat_BW % V).astype(jnp.int32)
            scores_BW = jnp.take_along_axis(total_BWV.reshape(B, W * V), flat_BW, axis=1)
            length_BW = jnp.take_along_axis(new_length_BW, parent_BW, axis=1)
            parent_done_BW = jnp.take_along_axis(finished_BW, parent_BW, axis=1)
            finished_BW = parent_done_BW | (token_BW == eos)
            seqs_BWN = jnp.take_along_axis(seqs_BWN, parent_BW[..., None], axis=1).at[:, :, i].set(token_BW)
            rows_X = (jnp.arange(B)[:, None] * W + parent_BW).reshape(-1)
            cache = reorder_rows(cache, rows_X)
            positions_X = jnp.minimum(engine.decoded_lengths(lengths_X) + i, slots - 1)
            logits_XV, cache = engine.decode_step(params, cache, token_BW.reshape(-1), positions_X)
            return logits_XV, cache, scores_BW, length_BW, finished_BW, seqs_BWN

        scores_BW = jnp.tile(jnp.where(jnp.arange(W) == 0, 0.0, -jnp.inf), (B, 1))
        state = (logits_XV, cache, scores_BW, jnp.zeros((B, W), jnp.int32), jnp.zeros((B, W), bool),
                 jnp.full((B, W, steps), engine.pad_id, jnp.int32))
        _, _, scores_BW, length_BW, _, seqs_BWN = jax.lax.fori_loop(0, steps, body, state)
        best_B = jnp.argmax(scores_BW / length_penalty(length_BW, alpha), axis=1)
        return (jnp.take_along_axis(seqs_BWN, best_B[:, None, None], axis=1)[:, 0],
                jnp.take_along_axis(scores_BW, best_B[:, None], axis=1)[:, 0])

    return jax.jit(program, static_argnames=("steps", "slots"))


def score_program(engine: Engine) -> Callable:
    """jit(params, tokens_BT) -> logp_BT1: log p(token t+1 | tokens <= t) from one causal forward, no cache."""

    def program(params, tokens_BT):
        logits_BTV = engine.model.apply({"params": params}, tokens_BT).heads["lm"][..., :engine.vocab_size]
        logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32))
        return jnp.take_along_axis(logp_BTV[:, :-1], tokens_BT[:, 1:, None], axis=-1)[..., 0]

    return jax.jit(program)
