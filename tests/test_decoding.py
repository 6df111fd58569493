"""The KV-cache decoding engine against the uncached model: greedy equality per positional scheme and for
batched prompts of different lengths, beam search (beam 1 = greedy, exhaustive on a tiny vocabulary),
sampling seeds, top-k=1, EOS per row, scoring, validation, and the CLI with --prompts_file."""

from __future__ import annotations

import itertools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.model_sizes import apply_model_size
from conftest import run_module
from llm_jax import config as config_lib
from llm_jax.decoding import text
from llm_jax.decoding.engine import DecodeOptions, build_engine
from llm_jax.errors import ConfigError
from llm_jax.models.families import build_model
from llm_jax.models.model_config import build_model_config
from test_train_e2e import trained  # noqa: F401 (the quick training run of the e2e tests, reused)

VOCAB, MAX_LEN = 20, 32
PROMPTS = [[3, 1, 4], [1, 5, 9, 2, 6, 5, 3], [7]]


def tiny_model(positional="learned", scan_layers=False, vocab=VOCAB, num_kv_heads=None):
    """(model_config, model, random params) of the 'test' size; numpy params with stddev 0.3 spread the logits
    so greedy choices are not near-ties decided by rounding."""
    config = config_lib.default_config()
    apply_model_size(config, "test")
    config.model.update(max_len=MAX_LEN, positional=positional, scan_layers=scan_layers, num_kv_heads=num_kv_heads)
    model_config = build_model_config(config.model, vocab, {"data": 1, "fsdp": 1, "tensor": 1})
    model = build_model(model_config)
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, MAX_LEN), jnp.int32))["params"])
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda leaf: jnp.asarray(0.3 * rng.normal(size=leaf.shape), leaf.dtype), shapes)
    return model_config, model, params


def uncached_greedy(model, params, prompt, steps, vocab=VOCAB):
    """Greedy decoding by full forward passes (no cache) over a MAX_LEN window padded with random filler (a
    causal model's logit at t does not read what follows t)."""
    apply = jax.jit(lambda p, x: model.apply({"params": p}, x).heads["lm"][..., :vocab])
    filler = np.random.default_rng(1).integers(0, vocab, size=MAX_LEN)
    tokens = list(prompt)
    for _ in range(steps):
        window = filler.copy()
        window[:len(tokens)] = tokens
        logits = np.asarray(apply(params, window[None].astype(np.int32)))[0, len(tokens) - 1]
        tokens.append(int(np.argmax(logits)))
    return tokens[len(prompt):]


@pytest.fixture(scope="module")
def learned():
    model_config, model, params = tiny_model("learned")
    return build_engine(model_config), model, params


@pytest.mark.parametrize("positional, scan_layers, num_kv_heads", [
    ("learned", False, None), ("sinusoidal", False, None), ("rope", False, None), ("alibi", False, None),
    ("rope", True, None), ("alibi", True, 2),  # scanned layers, grouped-query attention
    ("t5_relative_bias", True, None)])  # a bias with parameters, computed against the cache slots
def test_cached_greedy_equals_uncached_greedy_for_batched_prompts(positional, scan_layers, num_kv_heads):
    model_config, model, params = tiny_model(positional, scan_layers, num_kv_heads=num_kv_heads)
    engine = build_engine(model_config)
    cached = engine.generate(params, PROMPTS, DecodeOptions(max_new_tokens=8, temperature=0.0))
    assert cached == [uncached_greedy(model, params, prompt, 8) for prompt in PROMPTS]
    # each row alone (no padding, other shapes) gives the same tokens as in the batch
    assert engine.generate(params, PROMPTS[1:2], DecodeOptions(max_new_tokens=8, temperature=0.0)) == cached[1:2]


def test_generation_past_max_len_slides_the_window(learned):
    engine, model, params = learned
    prompt = [int(t) for t in np.random.default_rng(0).integers(0, VOCAB, size=MAX_LEN + 5)]
    tokens = engine.generate(params, [prompt], DecodeOptions(max_new_tokens=40, temperature=0.0))[0]
    assert len(tokens) == 40 and all(0 <= t < VOCAB for t in tokens)
    keep, steps = engine.window(40, len(prompt))  # the first window: the prompt's last `keep` tokens
    assert (keep, steps) == (MAX_LEN - MAX_LEN // 2, MAX_LEN // 2)
    assert tokens[:steps] == uncached_greedy(model, params, prompt[-keep:], steps)


def test_rows_stop_at_eos(learned):
    engine, model, params = learned
    greedy = [uncached_greedy(model, params, prompt, 8) for prompt in PROMPTS]
    eos = greedy[0][2]
    with_eos = build_engine(engine.model.config, eos_id=eos, pad_id=0)
    tokens = with_eos.generate(params, PROMPTS, DecodeOptions(max_new_tokens=8, temperature=0.0))
    expected = [row[:row.index(eos) + 1] if eos in row else row for row in greedy]
    assert tokens == expected and len(tokens[0]) == 3


def test_beam_of_one_is_greedy(learned):
    engine, model, params = learned
    greedy = engine.generate(params, PROMPTS, DecodeOptions(max_new_tokens=6, temperature=0.0))
    for alpha in (0.0, 0.6):
        beams = engine.generate(params, PROMPTS, DecodeOptions(max_new_tokens=6, beam_size=1, temperature=0.0,
                                                               length_penalty=alpha))
        assert beams == greedy
    # the beam program itself with one beam (beam_size=1 selects greedy in generate)
    assert engine.beam_search(params, PROMPTS, DecodeOptions(max_new_tokens=6, beam_size=1))[0] == greedy


@pytest.mark.parametrize("scan_layers", [False, True])  # scanned: the cache's batch axis is its second
def test_beam_search_finds_the_best_sequence_when_the_beam_covers_every_prefix(scan_layers):
    vocab = 5
    model_config, model, params = tiny_model("rope", scan_layers, vocab=vocab)
    engine = build_engine(model_config)
    prompts = [[1, 2], [4, 0, 3, 3]]
    every = [list(seq) for seq in itertools.product(range(vocab), repeat=3)]
    beams, scores = engine.beam_search(params, prompts, DecodeOptions(max_new_tokens=3, beam_size=vocab ** 2))
    for prompt, best, score in zip(prompts, beams, scores):
        totals = [float(np.sum(s)) for s in engine.score(params, [prompt] * len(every), every)]
        assert best == every[int(np.argmax(totals))]
        np.testing.assert_allclose(score, max(totals), rtol=1e-5)
    # a narrower beam never scores higher than the exhaustive one
    _, narrow = engine.beam_search(params, prompts, DecodeOptions(max_new_tokens=3, beam_size=2))
    assert np.all(narrow <= scores + 1e-5)


def test_programs_are_built_once_per_shape_and_options(learned):
    engine, _, params = learned
    fresh = build_engine(engine.model.config)
    for seed, new in [(0, 5), (1, 7), (2, 9)]:  # seeds and lengths are arguments: one program, one shape
        fresh.generate(params, PROMPTS, DecodeOptions(max_new_tokens=new, temperature=0.7, seed=seed))
    assert len(fresh._compiled) == 1
    assert next(iter(fresh._compiled.values()))._cache_size() == 1
    fresh.generate(params, PROMPTS, DecodeOptions(max_new_tokens=5, temperature=0.0))
    assert len(fresh._compiled) == 2


def test_beam_search_with_eos_ranks_by_the_gnmt_length_penalty():
    vocab, eos, alpha = 5, 2, 1.0
    model_config, _, params = tiny_model("learned", vocab=vocab)
    engine = build_engine(model_config, eos_id=eos)
    prompt = [1, 3]
    # every hypothesis of at most 3 new tokens: stopped by EOS, or 3 tokens long
    hypotheses = sorted({tuple(s[:s.index(eos) + 1]) if eos in s else s
                         for s in itertools.product(range(vocab), repeat=3)})
    totals = [float(np.sum(s)) for s in engine.score(params, [prompt] * len(hypotheses), hypotheses)]
    ranks = [total / ((5 + len(h)) / 6) ** alpha for total, h in zip(totals, hypotheses)]
    beams, _ = engine.beam_search(params, [prompt], DecodeOptions(max_new_tokens=3, beam_size=vocab ** 2,
                                                                  length_penalty=alpha))
    assert tuple(beams[0]) == hypotheses[int(np.argmax(ranks))]
    raw, _ = engine.beam_search(params, [prompt], DecodeOptions(max_new_tokens=3, beam_size=vocab ** 2))
    assert tuple(raw[0]) == hypotheses[int(np.argmax(totals))]


def test_many_prompts_are_decoded_in_batches(learned):
    engine, _, params = learned
    prompts = PROMPTS * 3
    greedy = engine.generate(params, prompts, DecodeOptions(max_new_tokens=4, temperature=0.0))
    assert engine.generate(params, prompts, DecodeOptions(max_new_tokens=4, temperature=0.0), max_rows=4) == greedy
    sampled = engine.generate(params, prompts, DecodeOptions(max_new_tokens=6, seed=5), max_rows=3)
    assert len(sampled) == 9 and sampled[0:3] != sampled[3:6]  # each batch draws its own numbers


def test_top_k_one_sampling_is_greedy(learned):
    engine, _, params = learned
    greedy = engine.generate(params, PROMPTS, DecodeOptions(max_new_tokens=6, temperature=0.0))
    assert engine.sample(params, PROMPTS, DecodeOptions(max_new_tokens=6, temperature=1.5, top_k=1, seed=3)) == greedy


def test_sampling_is_reproducible_per_seed_and_differs_across_seeds(learned):
    engine, _, params = learned
    runs = {seed: engine.generate(params, PROMPTS, DecodeOptions(max_new_tokens=12, temperature=1.0, seed=seed))
            for seed in (0, 1)}
    assert runs[0] == engine.generate(params, PROMPTS, DecodeOptions(max_new_tokens=12, temperature=1.0, seed=0))
    assert runs[0] != runs[1]
    assert all(len(row) == 12 and all(0 <= t < VOCAB for t in row) for row in runs[0])


def test_score_is_the_log_softmax_of_one_full_forward(learned):
    engine, model, params = learned
    prompts, continuations = [[3, 1, 4], [9]], [[1, 5, 9], [2, 6, 5, 3, 5]]
    scores = engine.score(params, prompts, continuations)
    for prompt, continuation, score in zip(prompts, continuations, scores):
        row = np.array([prompt + continuation], np.int32)
        logits = np.asarray(model.apply({"params": params}, row).heads["lm"][0, :, :VOCAB], np.float64)
        logp = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        expected = [logp[len(prompt) + i - 1, token] for i, token in enumerate(continuation)]
        np.testing.assert_allclose(score, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options, flag", [
    (dict(top_p=0.0), "--top_p=0.0"), (dict(top_p=1.5), "--top_p"), (dict(beam_size=0), "--beam_size=0"),
    (dict(max_new_tokens=0), "--max_new_tokens=0"), (dict(temperature=-1.0), "--temperature=-1.0"),
    (dict(top_k=-2), "--top_k=-2"), (dict(length_penalty=-1.0), "--length_penalty")])
def test_bad_options_name_their_flag(options, flag):
    with pytest.raises(ConfigError, match=flag):
        DecodeOptions(**options).check()


def test_empty_prompts_are_refused(learned):
    engine, _, params = learned
    with pytest.raises(ValueError, match="prompt 1 encodes to no tokens"):
        engine.generate(params, [[1], []], DecodeOptions(max_new_tokens=2))
    with pytest.raises(ValueError, match="beam search decodes in one window"):
        engine.generate(params, [[1]], DecodeOptions(max_new_tokens=MAX_LEN, beam_size=2))


@pytest.mark.parametrize("name, content, message", [
    ("p.jsonl", '"ok"\n{"prompt": 3}\n', "p.jsonl:2: no prompt string"),
    ("p.jsonl", '"ok"\n\nnot json\n', "p.jsonl:3: not JSON"),
    ("p.txt", "\n\n", "holds no prompts")])
def test_a_bad_prompts_file_names_the_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        text.read_prompts_file(str(path))


def test_prompts_files_read_jsonl_and_txt(tmp_path):
    (tmp_path / "p.jsonl").write_text('"a b"\n{"prompt": "c\\nd"}\n')
    (tmp_path / "p.txt").write_text("first line\n\nsecond\n")
    assert text.read_prompts_file(str(tmp_path / "p.jsonl"))[0] == ["a b", "c\nd"]
    assert text.read_prompts_file(str(tmp_path / "p.txt")) == (["first line", "second"],
                                                               [f"{tmp_path}/p.txt:1", f"{tmp_path}/p.txt:3"])


def test_cli_prompts_file_writes_jsonl_and_validates_before_loading(trained, tmp_path):  # noqa: F811
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('"The "\n{"prompt": "import"}\n' + json.dumps("x = 1\n" * 20) + "\n")  # > max_len=32 tokens
    args = [f"--workdir={trained}", f"--prompts_file={prompts}", "--max_new_tokens=12", "--temperature=0"]
    result = run_module("llm_jax.generate", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["prompt"] for line in lines] == ["The ", "import", "x = 1\n" * 20]
    assert "prompt 2 has" in result.stderr and "truncated to its last" in result.stderr
    single = run_module("llm_jax.generate", f"--workdir={trained}", "--prompt=import", "--max_new_tokens=12",
                        "--temperature=0")
    assert single.stdout == lines[1]["completion"] + "\n"  # batched rows decode as a prompt alone does
    import llm_jax

    loaded = llm_jax.load(str(trained))
    assert loaded.generate(["The ", "import"], max_new_tokens=12, temperature=0.0) == [
        line["completion"] for line in lines[:2]]
    scores = loaded.score(["The ", "import"], ["cat", " os"])
    assert [len(s) for s in scores] == [len(loaded.tokenizer.encode(c)) for c in ("cat", " os")]
    assert all(np.all(s < 0) for s in scores)
    beam = run_module("llm_jax.generate", *args, "--beam_size=3")
    assert beam.returncode == 0, beam.stderr[-3000:]
    assert len(beam.stdout.splitlines()) == 3
    for bad, message in [(["--top_p=0"], "--top_p=0.0"), (["--beam_size=0"], "--beam_size=0")]:
        failed = run_module("llm_jax.generate", *args, *bad)
        assert failed.returncode == 1 and message in failed.stderr and "Traceback" not in failed.stderr
    prompts.write_text('"ok"\n[1]\n')
    failed = run_module("llm_jax.generate", *args)
    assert failed.returncode == 1 and f"{prompts}:2" in failed.stderr
