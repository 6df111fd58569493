"""End to end through the real commands: train, resume after SIGTERM, evaluate, generate, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO_ROOT, final, metrics, run_module, shared_data_file, subprocess_env

QUICK = ["--config=experiments/python_docs.py:quick"]
# log windows of one chunk: every logged train/loss of a resumed run is comparable with the uninterrupted run's
RESUME_ARGS = ["--config.train.steps=300", "--config.train.steps_per_dispatch=2", "--config.train.log_every=2",
               "--config.train.eval_every=100", "--config.train.checkpoint_every=100"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An uninterrupted run of the quick experiment with the resume test's schedule."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    result = run_module("llm_jax.train", *QUICK, f"--workdir={workdir}", *RESUME_ARGS)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def test_training_writes_the_work_directory_and_loss_falls(trained):
    records = metrics(trained)
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert len(losses) == 150 and losses[-1] < losses[0] - 0.5, losses
    assert [r["step"] for r in records if "eval/loss" in r] == [100, 200, 300]
    assert all(r["train/tokens_per_second"] > 0 for r in records if "train/loss" in r)
    saved = json.loads((trained / "config.json").read_text())
    assert saved["config"]["train"]["steps"] == 300
    assert saved["provenance"]["packages"]["jax"] and saved["provenance"]["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}
    assert saved["model_config"]["padded_vocab_size"] % 128 == 0
    assert os.listdir(trained / "tensorboard") and (trained / "tokenizer" / "tokenizer.json").exists()
    assert sorted(os.listdir(trained / "checkpoints")) == ["200", "300"]
    assert records[0] == {"step": 0, "data/skipped_records": 0, "data/vocab_size": 512}


def test_sigterm_checkpoints_and_rerun_resumes_exactly(trained, tmp_path):
    workdir = tmp_path / "interrupted"
    command = [sys.executable, "-m", "llm_jax.train", *QUICK, f"--workdir={workdir}", *RESUME_ARGS]
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=subprocess_env(), stderr=subprocess.PIPE, text=True)
    for line in process.stderr:
        if "step  40/300" in line:
            process.send_signal(signal.SIGTERM)
            break
    process.stderr.read()
    assert process.wait(timeout=120) == 128 + signal.SIGTERM
    stopped_at = max(int(name) for name in os.listdir(workdir / "checkpoints"))
    assert 40 <= stopped_at < 300, "the signal handler checkpoints at the next chunk boundary and stops"

    with open(workdir / "metrics.jsonl", "a") as f:
        f.write('{"step": 1000, "train/lo')  # what a SIGKILL in the middle of a metrics write leaves
    result = run_module("llm_jax.train", *QUICK, f"--workdir={workdir}", *RESUME_ARGS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {workdir / 'checkpoints'} at step {stopped_at}" in result.stderr
    resumed, uninterrupted = metrics(workdir), metrics(trained)
    assert final(resumed, "eval/loss") == final(uninterrupted, "eval/loss")
    assert [(r["step"], r.get("train/loss")) for r in resumed if r["step"] > stopped_at] == \
        [(r["step"], r.get("train/loss")) for r in uninterrupted if r["step"] > stopped_at], "losses after the resume"
    assert [r["step"] for r in resumed] == [r["step"] for r in uninterrupted], "no duplicated or missing log steps"
    assert _tensorboard_steps(workdir, "train/loss") == [r["step"] for r in resumed if "train/loss" in r], \
        "TensorBoard drops the interrupted run's steps after the checkpoint: one curve"


def _tensorboard_steps(workdir, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(workdir / "tensorboard"))
    events.Reload()
    return [event.step for event in events.Scalars(tag)]


def test_a_resume_with_other_settings_is_refused_and_a_corrupt_checkpoint_is_named(trained, tmp_path):
    """A changed learning rate is refused before any work; a truncated newest checkpoint is named, and
    --restore_fallback resumes from the one before it and finishes like the uninterrupted run."""
    workdir = tmp_path / "copy"
    shutil.copytree(trained, workdir)
    refused = run_module("llm_jax.train", *QUICK, f"--workdir={workdir}", *RESUME_ARGS,
                         "--config.optimizer.learning_rate=0.5", "--config.train.steps=400")
    assert refused.returncode == 1 and "optimizer.learning_rate: 0.002 -> 0.5" in refused.stderr, refused.stderr
    assert "train.steps" not in refused.stderr.split("error: ")[-1], "train.steps may change freely"
    assert "Traceback" not in refused.stderr
    for data_file in (workdir / "checkpoints" / "300" / "state").rglob("d/*"):
        data_file.write_bytes(data_file.read_bytes()[: data_file.stat().st_size // 2])
    named = run_module("llm_jax.train", *QUICK, f"--workdir={workdir}", *RESUME_ARGS, "--config.train.steps=400")
    assert named.returncode == 1 and f"{workdir / 'checkpoints' / '300'} cannot be restored" in named.stderr
    assert "--restore_fallback" in named.stderr.splitlines()[-1] and "Traceback" not in named.stderr
    fallback = run_module("llm_jax.train", *QUICK, f"--workdir={workdir}", *RESUME_ARGS, "--restore_fallback")
    assert fallback.returncode == 0, fallback.stderr[-3000:]
    assert f"resumed from {workdir / 'checkpoints'} at step 200" in fallback.stderr
    assert final(metrics(workdir), "eval/loss") == final(metrics(trained), "eval/loss")
    assert os.listdir(workdir / "corrupt_checkpoints")[0].startswith("300-")
    record = json.loads((workdir / "config.json").read_text())
    assert record["config"]["train"]["steps"] == 300 and len(record["starts"]) == 1


def test_evaluate_appends_the_latest_checkpoints_metrics(trained):
    result = run_module("llm_jax.evaluate", f"--workdir={trained}")
    assert result.returncode == 0, result.stderr[-3000:]
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    assert printed["step"] == 300
    *training, appended = metrics(trained)
    assert printed["eval/loss"] == pytest.approx(final(training, "eval/loss"), rel=1e-6)
    # the appended line is told apart from the training run's own ones
    assert appended == {**printed, "source": "evaluate"}
    assert not any("source" in record for record in training)


def test_generate_is_reproducible_and_slides_past_max_len(trained):
    args = [f"--workdir={trained}", "--prompt=The ", "--max_new_tokens=80", "--temperature=0.8"]
    first = run_module("llm_jax.generate", *args, "--seed=1")
    second = run_module("llm_jax.generate", *args, "--seed=1")
    other = run_module("llm_jax.generate", *args, "--seed=2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout == second.stdout != other.stdout
    # 80 new tokens, more than max_len=32: the window slides; stdout holds the sampled text alone
    assert "sampled 80 tokens after a" in first.stderr
    assert first.stdout.endswith("\n") and first.stdout.strip() and "sampling from" not in first.stdout


@pytest.mark.parametrize("args, message", [
    (["--config.model.nmu_layers=3"], "nmu_layers"),
    (["--config.data.source=text_file", "--config.data.path=/nonexistent/corpus.txt"], "/nonexistent/corpus.txt: no such file"),
    (["--config.mesh.data=2"], "but there are 1 devices"),
    (["--config.train.batch_size=7", "--config.optimizer.grad_accum_steps=2"], "train.batch_size=7"),
])
def test_bad_input_fails_before_compiling_with_the_key(args, message, tmp_path):
    result = run_module("llm_jax.train", *QUICK, f"--workdir={tmp_path}", *args)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_empty_data_file_is_named(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    result = run_module("llm_jax.train", *QUICK, f"--workdir={tmp_path / 'run'}", "--config.data.source=text_file",
                        f"--config.data.path={empty}")
    assert result.returncode != 0 and f"{empty}:1: the file is empty" in result.stderr


DIVERGING = ["--config.optimizer.learning_rate=3000", "--config.optimizer.schedule=constant",
             "--config.optimizer.warmup_steps=0", "--config.optimizer.grad_clip_norm=0",
             "--config.train.checkpoint_every=1", "--config.train.steps_per_dispatch=1", "--config.train.eval_every=0",
             "--config.train.keep_checkpoints=100"]


def _saved_params(workdir, step: int):
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(workdir / "checkpoints" / str(step) / "state")["params"]


def test_a_diverging_run_never_checkpoints_a_state_that_is_not_known_good(tmp_path):
    """Saving every step with a learning rate that blows the parameters up: the run stops naming the step whose
    state gives a non-finite loss, and the newest checkpoint holds finite parameters equal to those of a run that
    stops one step earlier (the last good state), not the diverged one."""
    diverged = run_module("llm_jax.train", *QUICK, f"--workdir={tmp_path / 'diverged'}", *DIVERGING,
                          "--config.train.steps=30")
    assert diverged.returncode == 1, diverged.stderr[-3000:]
    assert "was not checkpointed" in diverged.stderr and "Traceback" not in diverged.stderr, diverged.stderr[-2000:]
    bad_step = int(diverged.stderr.split("the state after step ")[1].split(" ")[0])
    saved = sorted(int(name) for name in os.listdir(tmp_path / "diverged" / "checkpoints"))
    assert saved == list(range(1, bad_step)), "every good step saved, the bad one not"
    good = run_module("llm_jax.train", *QUICK, f"--workdir={tmp_path / 'good'}", *DIVERGING,
                      f"--config.train.steps={bad_step - 1}")
    assert good.returncode == 0, good.stderr[-3000:]
    last_saved, last_good = _saved_params(tmp_path / "diverged", saved[-1]), _saved_params(tmp_path / "good", saved[-1])
    for saved_leaf, good_leaf in zip(jax.tree.leaves(last_saved), jax.tree.leaves(last_good)):
        assert np.isfinite(saved_leaf).all() and np.array_equal(saved_leaf, good_leaf)


def test_wikitext2_quick_trains_and_evaluates_the_whole_test_split(tmp_path):
    shared_data_file("wikitext2_valid.txt")
    # the first 1000 of the test file's 4358 lines as the test split: evaluating all of it would take ~20 s
    test_lines = shared_data_file("wikitext2_test.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    (tmp_path / "test_part.txt").write_text("".join(test_lines[:1000]), encoding="utf-8")
    workdir = tmp_path / "wikitext2"
    result = run_module("llm_jax.train", "--config=experiments/wikitext2.py:quick", f"--workdir={workdir}",
                        f"--config.data.eval_path={tmp_path / 'test_part.txt'}")
    assert result.returncode == 0, result.stderr[-3000:]
    evaluated = run_module("llm_jax.evaluate", f"--workdir={workdir}", "--split=test", "--eval_steps=-1")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    printed = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert printed["step"] == 20 and 1.0 < printed["eval/perplexity"] < 1024
    # the whole test split: every packed row once, so more target tokens than train.eval_steps batches hold
    assert printed["eval/tokens"] > 4 * 8 * 32
