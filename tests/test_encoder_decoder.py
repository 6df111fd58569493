"""The encoder-decoder family (T5 and original-Transformer styles): packed rows equal examples alone, the KV and
cross-attention caches decode exactly the tokens of uncached greedy decoding, beam search (beam 1 = greedy,
exhaustive on a tiny vocabulary), scoring, the exact-match metric equals greedy generation, T5's relative
buckets, and the span-corruption / seq2seq experiments end to end."""

from __future__ import annotations

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llm_jax
from configs.encoder_decoder import ENCODER_DECODER_STYLES
from conftest import final, metrics, needs, run_module, shared_data_file
from llm_jax.decoding.engine import DecodeOptions, build_engine
from llm_jax.models.components.t5_relative_bias import relative_position_bucket
from llm_jax.models.families import build_model
from llm_jax.models.model_config import make_model_config
from llm_jax.tasks.seq2seq import exact_match_sums

VOCAB = 23
PROMPTS = [[3, 1, 4, 1, 5], [9, 2], [6, 5, 3, 5, 8, 9, 7]]


def tiny(style="t5", scan_layers=False, vocab=VOCAB, **changes):
    """(model_config, model, random params with stddev 0.3: greedy choices are not near-ties)."""
    cfg = make_model_config(**{**ENCODER_DECODER_STYLES.get(style), "vocab_size": vocab, "num_layers": 2,
                               "num_decoder_layers": 3, "num_heads": 4, "d_model": 32, "max_len": 32,
                               "scan_layers": scan_layers, **changes})
    model = build_model(cfg)
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32),
                                     jnp.zeros((1, 8), jnp.int32))["params"])
    rng = np.random.default_rng(0)
    return cfg, model, jax.tree.map(lambda leaf: jnp.asarray(0.3 * rng.normal(size=leaf.shape), leaf.dtype), shapes)


def uncached_greedy(model, params, prompts, steps, vocab=VOCAB, start=0):
    """Greedy decoding of each prompt by full passes (no cache) over a decoder window of steps + 1 positions
    padded with filler: a causal decoder's logit at t does not read what follows t."""
    apply = jax.jit(lambda p, x, y: model.apply({"params": p}, x, y).heads["lm"][0, :, :vocab])
    outputs = []
    for prompt in prompts:
        window = np.full(steps + 1, vocab - 1, np.int32)
        window[0] = start
        for t in range(steps):
            window[t + 1] = int(np.argmax(apply(params, jnp.array([prompt]), window[None])[t]))
        outputs.append(window[1:].tolist())
    return outputs


@pytest.mark.parametrize("style, scan_layers", [("t5", True), ("transformer", False)])
def test_cached_greedy_equals_uncached_greedy(style, scan_layers):
    cfg, model, params = tiny(style, scan_layers)
    engine = build_engine(cfg)
    got = engine.generate(params, PROMPTS, DecodeOptions(max_new_tokens=6, temperature=0.0))
    assert got == uncached_greedy(model, params, PROMPTS, 6)
    # beam search with one beam is greedy (beam_size=1 selects greedy in generate: call the beam program)
    assert engine.beam_search(params, PROMPTS, DecodeOptions(max_new_tokens=6, beam_size=1))[0] == got


def test_beam_search_finds_the_best_sequence_when_the_beam_covers_every_prefix():
    vocab = 5
    cfg, model, params = tiny("t5", True, vocab=vocab)
    engine = build_engine(cfg)
    every = [list(seq) for seq in itertools.product(range(vocab), repeat=3)]
    beams, scores = engine.beam_search(params, PROMPTS[:2], DecodeOptions(max_new_tokens=3, beam_size=vocab ** 2))
    for prompt, best, score in zip(PROMPTS[:2], beams, scores):
        totals = [float(np.sum(s)) for s in engine.score(params, [prompt] * len(every), every)]
        assert best == every[int(np.argmax(totals))]
        np.testing.assert_allclose(score, max(totals), rtol=1e-5)


def test_score_is_the_teacher_forced_log_softmax():
    cfg, model, params = tiny("transformer")
    engine = build_engine(cfg)
    continuation = [4, 7, 2]
    [logp] = engine.score(params, [PROMPTS[0]], [continuation])
    logits = model.apply({"params": params}, jnp.array([PROMPTS[0]]), jnp.array([[0] + continuation[:-1]]))
    expected = jax.nn.log_softmax(logits.heads["lm"][0, :, :VOCAB])[jnp.arange(3), jnp.array(continuation)]
    np.testing.assert_allclose(logp, expected, atol=1e-5)


@pytest.mark.parametrize("style", ["t5", "transformer"])
def test_a_packed_row_gives_each_example_the_logits_it_gets_alone(style):
    """Segment ids mask encoder self-attention, decoder self-attention and cross-attention per example;
    positions restart per example (T5's buckets and sinusoids see the same distances)."""
    cfg, model, params = tiny(style)
    a_in, a_dec, b_in, b_dec = [3, 4, 5, 6], [0, 7, 8], [9, 10, 11], [0, 12, 13, 14]
    apply = jax.jit(lambda x, y, **segments: model.apply({"params": params}, x, y, **segments).heads["lm"][0])
    alone = [apply(jnp.array([x]), jnp.array([y])) for x, y in ((a_in, a_dec), (b_in, b_dec))]
    pad_in, pad_dec = 2, 1
    inputs = a_in + b_in + [0] * pad_in
    segments = [1] * 4 + [2] * 3 + [0] * pad_in
    decoder = a_dec + b_dec + [0] * pad_dec
    decoder_segments = [1] * 3 + [2] * 4 + [0] * pad_dec
    logits = apply(jnp.array([inputs]), jnp.array([decoder]), segment_ids_BS=jnp.array([segments]),
                   decoder_segment_ids_BT=jnp.array([decoder_segments]))
    np.testing.assert_allclose(logits[:3], alone[0], atol=1e-4)
    np.testing.assert_allclose(logits[3:7], alone[1], atol=1e-4)


@pytest.mark.slow
def test_exact_match_is_what_greedy_decoding_reproduces():
    """eval/exact_match counts the examples whose every target is the teacher-forced argmax: the examples
    whose targets greedy decoding writes exactly. Half the targets are the greedy outputs, half differ."""
    cfg, model, params = tiny("t5")
    engine = build_engine(cfg)
    greedy = engine.generate(params, PROMPTS, DecodeOptions(max_new_tokens=4, temperature=0.0))
    targets = [greedy[0], [t for t in greedy[1][:2]] + [(greedy[1][2] + 1) % VOCAB, greedy[1][3]], greedy[2]]
    targets[2] = [(greedy[2][0] + 3) % VOCAB] + greedy[2][1:]
    assert uncached_greedy(model, params, PROMPTS, 4) == greedy
    apply = jax.jit(lambda x, y: model.apply({"params": params}, x, y).heads["lm"])
    for prompt, target, reproduced in zip(PROMPTS, targets, greedy):
        batch = {"targets": jnp.array([target]), "weights": jnp.ones((1, 4)),
                 "targets_segment_ids": jnp.ones((1, 4), jnp.int32)}
        exact, examples = exact_match_sums(apply(jnp.array([prompt]), jnp.array([[0] + target[:-1]])), batch)
        assert (float(exact), float(examples)) == (float(target == reproduced), 1.0)
    assert targets[0] == greedy[0] and targets[1] != greedy[1] and targets[2] != greedy[2]


@pytest.mark.slow
def test_t5_buckets_match_transformers():
    """The bucket of every distance in -300..300, bidirectional and causal, equals transformers' T5."""
    torch = pytest.importorskip("torch")
    from transformers.models.t5.modeling_t5 import T5Attention

    relative = np.arange(-300, 301)[None, None]
    for bidirectional in (True, False):
        for buckets, distance in ((32, 128), (16, 40)):
            ours = relative_position_bucket(jnp.asarray(relative), bidirectional, buckets, distance)
            theirs = T5Attention._relative_position_bucket(torch.tensor(relative), bidirectional, buckets, distance)
            np.testing.assert_array_equal(np.asarray(ours), theirs.numpy())


def test_sentinels_print_as_extra_ids():
    from llm_jax.decoding.text import decode_completion

    class Chars:
        vocab_size = 5

        def decode(self, ids):
            return "".join("abcde"[i] for i in ids)

    engine = build_engine(tiny("t5", vocab=8)[0])
    assert decode_completion(Chars(), engine, [0, 7, 1, 2, 6, 3]) == "a<extra_id_0>bc<extra_id_1>d"


@pytest.mark.slow
def test_text_to_text_sst2_end_to_end(tmp_path):
    """t5_sst2:quick trains through the command (seq2seq rows from the labelled TSV, the encoder-decoder family,
    eval/accuracy), then the Python API decodes, scores and returns logits from the run. (Span corruption runs
    through the real pipeline in tests/test_sharding.py; init_from chaining is tested for every family in
    tests/test_init_from.py.)"""
    needs(shared_data_file("sst2_train.tsv").exists(), "../shared/data/sst2_train.tsv is missing")
    finetune = tmp_path / "sst2"
    result = run_module("llm_jax.train", "--config=experiments/t5_sst2.py:quick", f"--workdir={finetune}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert 0.0 <= final(metrics(finetune), "eval/accuracy") <= 1.0
    model = llm_jax.load(str(finetune))  # the Python API over the same engine: greedy, beam, scores, logits
    [greedy] = model.generate(["sst2 sentence: a fine film"], max_new_tokens=3, temperature=0.0)
    assert isinstance(greedy, str)
    assert len(model.generate(["sst2 sentence: dull"], max_new_tokens=3, beam_size=2)) == 1
    [logp] = model.score(["sst2 sentence: a fine film"], ["positive"])
    assert np.all(logp < 0) and np.all(np.isfinite(logp))
    logits = model.logits([[5, 6, 7]], [[0, 8]])
    assert logits.shape == (1, 2, model.model_config.vocab_size)
