"""Evaluation at other context lengths (evaluate --seq_len): direct for computed positions, sliding windows of
model.max_len for learned ones, each token scored once; and the positional-encoding ablation's sweep and report."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import metrics, run_module, window_config
from launch import length_report, sweep
from llm_jax.errors import ConfigError
from llm_jax.training.length_eval import evaluate_checkpoint
from llm_jax.models.model_config import build_model_config
from llm_jax.models.positions import POSITIONALS
from llm_jax.training import length_eval, loop, run_record
from llm_jax.training.steps import apply_model

pytestmark = pytest.mark.slow  # run with --slow (README); the default suite stays under 15 min

SEQ_LEN = 16  # trained length = model.max_len
ABLATION = "experiments/ablation_positions.py"


def _train(tmp_path_factory, positional: str) -> str:
    """A 10-step run of the `test`-size decoder with `positional` on random characters; returns its workdir."""
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text("".join(np.random.default_rng(0).choice(list("abcdefghij klmnop\n"), size=5000)))
    config = window_config(SEQ_LEN, 4, 10)
    config.model.positional = positional
    config.data.path = str(path)
    config.train.update(eval_every=0, eval_steps=2, checkpoint_every=0, log_every=10, steps_per_dispatch=10)
    workdir = str(tmp_path_factory.mktemp(positional))
    loop.train(config, workdir, devices=jax.devices()[:1])
    return workdir


@pytest.fixture(scope="module")
def learned_run(tmp_path_factory) -> str:
    return _train(tmp_path_factory, "learned")


@pytest.fixture(scope="module")
def rope_run(tmp_path_factory) -> str:
    return _train(tmp_path_factory, "rope")


# ----------------------------------------------------------------------------- windows


@pytest.mark.parametrize("seq_len,window,stride", [(16, 16, 8), (40, 16, 8), (37, 16, 5), (33, 16, 16), (5, 16, 8)])
def test_sliding_windows_score_every_position_once(seq_len, window, stride):
    counted = np.zeros(seq_len, int)
    size = min(window, seq_len)
    for each in length_eval.sliding_windows(seq_len, size, min(stride, size)):
        assert 0 <= each.start and each.start + size <= seq_len and each.start <= each.first_scored
        assert each.first_scored == 0 or each.first_scored - each.start >= size - stride  # at least W - S context
        counted[each.first_scored:each.start + size] += 1
    assert (counted == 1).all(), counted


def test_window_batch_restarts_positions_of_the_document_it_starts_in():
    segments = np.array([[1] * 10 + [2] * 6])
    positions = np.array([list(range(10)) + list(range(6))])
    batch = {"inputs": np.arange(16)[None], "targets": np.arange(16)[None], "weights": np.ones((1, 16), np.float32),
             "segment_ids": segments, "positions": positions}
    view = length_eval.window_batch(batch, length_eval.Window(start=6, first_scored=8), size=8)
    assert view["positions"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 3]]
    assert view["weights"].tolist() == [[0, 0, 1, 1, 1, 1, 1, 1]]
    assert view["inputs"].tolist() == [list(range(6, 14))]


def test_sliding_window_equals_brute_force_per_token_scores(learned_run):
    """The windowed loss sum over 40-token rows equals each token scored alone on the context its window gives:
    from the start of the first window, stride-aligned (or moved back to the row's end), that reaches past it.
    Every context is a row of `window` tokens with the one target weighted (later tokens are masked causally)."""
    run = length_eval.build_run_at_length(learned_run, 40)
    _, params = length_eval.restore_latest_params(run)
    tokens = np.random.default_rng(1).integers(0, run.tokenizer.vocab_size, (2, 41)).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((2, 40), np.float32)}
    window, stride = SEQ_LEN, 6

    @jax.jit
    def loss_sum(view):
        log_probs = jax.nn.log_softmax(apply_model(run.model, run.task, params, view).heads["lm"].astype(jnp.float32))
        picked = jnp.take_along_axis(log_probs, view["targets"][..., None], -1)[..., 0]
        return -(picked * view["weights"]).sum(), view["weights"].sum()

    contexts = {"inputs": [], "targets": [], "weights": []}
    for t in range(40):
        start = min((0 if t < window else (t - window) // stride + 1) * stride, 40 - window)
        for key in ("inputs", "targets"):
            contexts[key].append(batch[key][:, start:start + window])
        contexts["weights"].append(np.broadcast_to(np.arange(window) == t - start, (2, window)).astype(np.float32))
    with jax.set_mesh(run.mesh), run.rules_context():
        windowed = [loss_sum(view) for view in length_eval.window_views(window, stride)(batch)]
        brute, count = loss_sum({key: np.concatenate(value) for key, value in contexts.items()})
    assert sum(float(n) for _, n in windowed) == float(count) == 2 * 40
    np.testing.assert_allclose(sum(float(loss) for loss, _ in windowed), float(brute), rtol=1e-5)


# ----------------------------------------------------------------------------- evaluate --seq_len


def test_learned_positions_slide_past_max_len_and_match_direct_at_the_trained_length(learned_run):
    (_, direct, direct_fields, _), (_, longer, fields, _) = length_eval.evaluate_lengths(learned_run, [SEQ_LEN, 64])
    (_, sliding, sliding_fields, _), = length_eval.evaluate_lengths(learned_run, [SEQ_LEN], method="sliding_window")
    assert direct_fields == {"eval_len16/length_method": "direct"}  # auto: within max_len
    assert sliding_fields == {"eval_len16/length_method": "sliding_window"}
    assert sliding["eval_len16/loss"] == pytest.approx(direct["eval_len16/loss"], rel=1e-6)
    assert fields == {"eval_len64/length_method": "sliding_window"}
    assert longer["eval_len64/seq_len"] == 64 and longer["eval_len64/tokens"] == 2 * 4 * 64
    with pytest.raises(ConfigError, match="sliding_window"):
        evaluate_checkpoint(learned_run, None, None, 4 * SEQ_LEN, "direct")


def test_evaluate_cli_runs_rope_directly_at_twice_the_length(rope_run):
    result = run_module("llm_jax.evaluate", f"--workdir={rope_run}", "--seq_len=32", timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    assert printed["eval_len32/length_method"] == "direct" and printed["eval_len32/seq_len"] == 32
    assert np.isfinite(printed["eval_len32/loss"]) and printed["eval_len32/tokens"] == 2 * 4 * 32
    line = metrics(rope_run)[-1]
    assert line["source"] == "evaluate" and line["eval_len32/length_method"] == "direct"
    assert "eval/loss" not in line  # the training run's final eval/loss stays the trained length's


def test_bad_seq_len_fails_in_one_line_before_loading(tmp_path):
    missing = str(tmp_path / "no_such_run")  # loading first would fail on the work directory instead
    for value in (0, -3, 2.5, "abc"):
        with pytest.raises(ConfigError, match="--seq_len"):
            evaluate_checkpoint(missing, None, None, value)
    result = run_module("llm_jax.evaluate", f"--workdir={missing}", "--seq_len=0", timeout=120)
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1].startswith("error: --seq_len=0"), \
        result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "no_such_run" not in result.stderr


# ----------------------------------------------------------------------------- the ablation


@pytest.mark.parametrize("dataset", ["shakespeare", "wikitext2"])
def test_quick_ablation_sweep_builds_a_run_per_encoding(dataset):
    runs = sweep.expand_sweep(f"{ABLATION}:quick,dataset={dataset}")
    assert sorted(run.overrides["model.positional"] for run in runs) == POSITIONALS.names()
    module = sweep.load_experiment(ABLATION)
    for run in runs:
        config = sweep.build_run_config(module, f"quick,dataset={dataset}", run.overrides, [], run.name)
        assert config.model.positional == run.overrides["model.positional"]
        assert config.data.seq_len == config.model.max_len


def _write_run(workdir, positional: str, lines: list[dict]) -> None:
    """A finished run without training: config.json (32-token rows, max_len 32) and metrics.jsonl."""
    config = window_config(32, 4, 10)
    config.model.positional = positional
    model_config = build_model_config(config.model, 65, {})
    run_record.write_first_start(str(workdir), config, model_config, {})
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def _synthetic_sweep(directory) -> None:
    """A finished ablation sweep: each run's metrics.jsonl holds train losses and evaluate's lines at 1x, 2x
    and 4x of its 32-token training length (learned: sliding windows past it)."""
    encodings = ["learned", "rope", "alibi"]
    runs = [sweep.Run(name, {"model.positional": encoding}, str(directory / name)) for name, encoding in
            zip(sweep.run_names([{"model.positional": name} for name in encodings]), encodings)]
    sweep.write_sweep_file(str(directory), sweep.sweep_record(ABLATION, "local", [], runs))
    for index, (run, encoding) in enumerate(zip(runs, encodings)):
        lines = [{"step": step, "train/loss": 3.0 - step / 10 + index / 10} for step in (0, 5, 10)]
        lines.append({"step": 10, "eval/loss": 2.0 + index / 10})
        for factor in (1, 2, 4):
            length = 32 * factor
            method = "sliding_window" if encoding == "learned" and factor > 1 else "direct"
            lines.append({"step": 10, f"eval_len{length}/loss": 2.0 + index * factor / 10 + factor / 100,
                          f"eval_len{length}/seq_len": float(length), f"eval_len{length}/length_method": method,
                          "source": "evaluate"})
        _write_run(directory / run.name, encoding, lines)


def test_length_report_writes_a_table_and_plots_from_metrics(tmp_path):
    for dataset in ("shakespeare", "wikitext2"):
        _synthetic_sweep(tmp_path / dataset)
    out = tmp_path / "ablation"
    text = length_report.write_length_report([str(tmp_path / "shakespeare"), str(tmp_path / "wikitext2")],
                                             (1, 2, 4), str(out), evaluate=False)
    lines = text.strip().splitlines()
    assert lines[0].startswith("| encoding | dataset |") and len(lines) == 2 + 6
    learned = next(line for line in lines if line.startswith("| learned | shakespeare"))
    assert "| 2.0100 | 2.0200 | 2.0400 | 32/64/128 | sliding_window |" in learned, learned
    assert lines[-1].startswith("| alibi | wikitext2 |") and lines[-1].endswith("| direct |"), lines[-1]
    for suffix in ("_train_loss.png", "_length.png"):
        assert (tmp_path / f"ablation{suffix}").stat().st_size > 10_000
    assert (tmp_path / "ablation.md").read_text().count("| learned |") == 2
