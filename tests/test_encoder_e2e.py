"""End to end through the real commands for the encoder family: masked LM + NSP pretraining with an exact resume
after SIGTERM, --compile_only feeding the keys training feeds, fine-tuning a classifier from the pretrained work
directory with frozen layers, and bad input reported in one line before anything is compiled.

The runs start from experiments/python_docs.py:quick (no data file needed; a SentencePiece tokenizer, which has
the mask/cls/sep specials) made a BERT-style encoder by the ENCODER overrides.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT, final, metrics, run_module, subprocess_env

QUICK = ["--config=experiments/python_docs.py:quick"]
ENCODER_KEYS = dict(family="encoder", norm_position="post", type_vocab_size=2, embedding_norm=True, pooler=True,
                    positional="learned", use_bias=True)
ENCODER = [f"--config.model.{key}={value}" for key, value in ENCODER_KEYS.items()]
MLM = ["--config.data.objective=masked_lm", "--config.data.sentence_task=nsp", *ENCODER]
RESUME_ARGS = ["--config.train.steps=60", "--config.train.steps_per_dispatch=2", "--config.train.log_every=10",
               "--config.train.eval_every=30", "--config.train.checkpoint_every=20"]
EMBEDDINGS = ("token_embedding", "position_embedding", "token_type_embedding", "embedding_norm")


def flat(params: dict, prefix: str = "") -> dict[str, np.ndarray]:
    """Nested parameter dicts -> {"block_0/mlp/up/kernel": array}."""
    out = {}
    for name, value in params.items():
        path = f"{prefix}{name}"
        if isinstance(value, dict):
            out.update(flat(value, path + "/"))
        else:
            out[path] = np.asarray(value)
    return out


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """An uninterrupted MLM + NSP run: the reference of the resume test and the source of the fine-tuning test.
    Its compiled programs land in the suite's compilation cache (conftest.subprocess_env), so the interrupted and
    resumed runs and evaluate load them instead of compiling again."""
    workdir = tmp_path_factory.mktemp("mlm_uninterrupted")
    result = run_module("llm_jax.train", *QUICK, *MLM, f"--workdir={workdir}", *RESUME_ARGS)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


# ----------------------------------------------------------------------------- 1. exact resume of MLM + NSP


def test_mlm_nsp_run_resumes_exactly_after_sigterm(pretrained, tmp_path):
    uninterrupted = metrics(pretrained)
    assert [r["step"] for r in uninterrupted if "eval/mlm_loss" in r] == [30, 60]
    assert {"eval/mlm_accuracy", "eval/nsp_loss", "eval/nsp_accuracy", "eval/loss"} <= set(uninterrupted[-1])
    losses = [r["train/loss"] for r in uninterrupted if "train/loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0], losses

    workdir = tmp_path / "interrupted"
    command = [sys.executable, "-m", "llm_jax.train", *QUICK, *MLM, f"--workdir={workdir}", *RESUME_ARGS]
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=subprocess_env(), stderr=subprocess.PIPE,
                               text=True)
    seen = []
    for line in process.stderr:
        seen.append(line)
        if "step 10/60" in line:
            process.send_signal(signal.SIGTERM)
            break
    rest = process.stderr.read()
    assert process.wait(timeout=120) == 128 + signal.SIGTERM, "".join(seen)[-2000:] + rest[-2000:]
    stopped_at = max(int(name) for name in os.listdir(workdir / "checkpoints") if name.isdigit())
    assert 10 <= stopped_at < 60, "the signal handler checkpoints at the next chunk boundary and stops"
    assert f"checkpointed step {stopped_at}, stopping" in rest

    result = run_module("llm_jax.train", *QUICK, *MLM, f"--workdir={workdir}", *RESUME_ARGS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {workdir / 'checkpoints'} at step {stopped_at}" in result.stderr
    resumed = metrics(workdir)
    # masking and pairing come from (data.seed, the example's position): a resumed run sees the same masks
    for key in ("eval/mlm_loss", "eval/mlm_accuracy", "eval/nsp_loss", "eval/nsp_accuracy", "train/loss"):
        assert final(resumed, key) == final(uninterrupted, key), key
    assert [r["step"] for r in resumed] == [r["step"] for r in uninterrupted], "no duplicated or missing log steps"
    assert [r for r in resumed if "eval/loss" in r] == [r for r in uninterrupted if "eval/loss" in r]
    # every train log after the first one following the checkpoint averages the same steps
    first_log_after = (stopped_at // 10 + 1) * 10
    for before, after in zip(uninterrupted, resumed):
        if "train/loss" in before and before["step"] > first_log_after:
            assert after["train/loss"] == before["train/loss"], before["step"]
    assert (workdir / "tokenizer" / "spm.model").read_bytes() == (pretrained / "tokenizer" / "spm.model").read_bytes()


# ----------------------------------------------------------------------------- 2. --compile_only feeds the train keys


def _python_docs_config(objective: str, tmp_path, **data):
    path = REPO_ROOT / "experiments" / "python_docs.py"
    spec = importlib.util.spec_from_file_location("python_docs_experiment", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("quick")
    config.data.tfds_data_dir = str(tmp_path / "tfds")
    config.data.objective = objective
    config.data.update(data)
    if objective == "masked_lm":
        config.model.update(ENCODER_KEYS)
    return config


@pytest.mark.parametrize("objective, data", [
    ("causal_lm", dict(separate_documents=True)),
    ("causal_lm", dict(separate_documents=False)),
    ("masked_lm", dict(sentence_task="nsp")),
    ("masked_lm", dict(sentence_task="none")),
], ids=["causal_lm-separate_documents", "causal_lm-joined", "masked_lm-nsp", "masked_lm-no_pairs"])
def test_compile_only_batches_are_the_batches_training_feeds(objective, data, tmp_path):
    from llm_jax.training.aot import abstract_batches
    from llm_jax.training.run import build_run

    config = _python_docs_config(objective, tmp_path, **data)
    run = build_run(config, str(tmp_path / "run"))
    try:
        steps = config.train.steps_per_dispatch
        chunk = run.data.train.next_chunk(steps)
    finally:
        run.data.train.close()
    abstract = abstract_batches(run)
    fed = {key: (tuple(value.shape), np.dtype(value.dtype)) for key, value in chunk.items()}
    compiled = {key: (tuple(value.shape), np.dtype(value.dtype)) for key, value in abstract.items()}
    assert compiled == fed
    assert fed["inputs"][0] == (steps, config.train.batch_size, config.data.seq_len)
    if objective == "causal_lm":
        assert ("segment_ids" in fed) == ("positions" in fed) == data["separate_documents"]
    else:
        assert fed["sentence_labels"] == ((steps, config.train.batch_size), np.dtype(np.int32))


def test_compile_only_cli_prints_a_json_report_for_masked_lm(tmp_path):
    result = run_module("llm_jax.train", *QUICK, *MLM, f"--workdir={tmp_path}", "--compile_only")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}
    assert report["parameters"] > 0 and report["params_bytes_per_device"] > 0
    assert report["compile_seconds"] > 0
    assert not (tmp_path / "checkpoints").exists()


# ----------------------------------------------------------------------------- 3. fine-tuning from the pretrained run

UNLABELLED_TSV = ["--config.data.objective=classification", "--config.data.source=tsv",
                  "--config.data.text_columns=('sentence',)", "--config.data.label_column=label", *ENCODER]
CLASSIFICATION = [*UNLABELLED_TSV, "--config.data.labels=('0','1')"]
WORDS = {0: "the list of a string returns value with for".split(),
         1: "class object method import module raise error while".split()}


def write_tsv(path, rows: int, seed: int) -> None:
    """`sentence<TAB>label` rows; the label follows from the words, so it is learnable."""
    rng = random.Random(seed)
    lines = ["sentence\tlabel"]
    for index in range(rows):
        label = index % 2
        lines.append(" ".join(rng.choice(WORDS[label]) for _ in range(rng.randint(4, 9))) + f"\t{label}")
    path.write_text("\n".join(lines) + "\n")


def test_classification_fine_tunes_from_the_pretrained_encoder(pretrained, tmp_path):
    train_tsv, eval_tsv, workdir = tmp_path / "train.tsv", tmp_path / "eval.tsv", tmp_path / "classifier"
    write_tsv(train_tsv, 200, seed=1)
    write_tsv(eval_tsv, 40, seed=2)
    result = run_module("llm_jax.train", *QUICK, *CLASSIFICATION, f"--workdir={workdir}",
                        f"--config.data.path={train_tsv}", f"--config.data.eval_path={eval_tsv}",
                        f"--config.data.tokenizer_path={pretrained / 'tokenizer' / 'spm.model'}",
                        f"--config.train.init_from={pretrained}", "--config.train.freeze=('embeddings','layers:1')",
                        "--config.train.steps=30", "--config.train.eval_every=0")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"parameter arrays from {pretrained}; new: classifier/bias, classifier/kernel" in result.stderr
    assert (workdir / "tokenizer" / "spm.model").read_bytes() == (pretrained / "tokenizer" / "spm.model").read_bytes()

    from llm_jax.training.init_from import read_source_params

    source, source_config = read_source_params(str(pretrained))
    tuned, tuned_config = read_source_params(str(workdir))
    source, tuned = flat(source), flat(tuned)
    assert source_config["family"] == tuned_config["family"] == "encoder"
    frozen = [path for path in tuned if path.split("/")[0] in EMBEDDINGS + ("block_0",)]
    assert {path.split("/")[0] for path in frozen} == set(EMBEDDINGS) | {"block_0"}
    for path in frozen:
        assert tuned[path].dtype == source[path].dtype and np.array_equal(tuned[path], source[path]), path
    block_1 = [path for path in tuned if path.startswith("block_1/")]
    assert block_1 and any(not np.array_equal(tuned[path], source[path]) for path in block_1)
    assert tuned["classifier/kernel"].shape == (32, 2) and "classifier/kernel" not in source
    assert not any(path.startswith(("mlm_head/", "nsp_head/")) for path in tuned)

    records = metrics(workdir)
    assert records[0]["data/vocab_size"] == metrics(pretrained)[0]["data/vocab_size"]
    last_eval = [r for r in records if "eval/accuracy" in r][-1]
    assert last_eval["step"] == 30 and 0.0 <= last_eval["eval/accuracy"] <= 1.0 and 0.0 <= last_eval["eval/f1"] <= 1.0

    evaluated = run_module("llm_jax.evaluate", f"--workdir={workdir}")  # the run's eval step
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    printed = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert printed["step"] == 30
    for key in ("eval/accuracy", "eval/f1", "eval/precision/0", "eval/recall/0", "eval/precision/1",
                "eval/recall/1"):
        assert key in printed, key
    assert printed["eval/accuracy"] == pytest.approx(last_eval["eval/accuracy"], abs=1e-6)


# ----------------------------------------------------------------------------- 4. bad input: one line, before compiling


def assert_one_line_error(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, result.stderr[-3000:]
    assert "parameters | mesh" not in result.stderr, "the model was built: the error came after the checks"


@pytest.mark.parametrize("args, message", [
    (["--config.data.objective=masked_lm"],
     "data.objective='masked_lm' runs on model.family in ['encoder'], not 'decoder'"),
    (["--config.data.objective=masked_lm", *ENCODER, "--config.train.init_from=/nonexistent/pretrained"],
     "train.init_from=/nonexistent/pretrained"),
    (["--config.data.objective=masked_lm", *ENCODER, "--config.train.freeze=('nothing_matches',)"],
     "train.freeze item 'nothing_matches' matches no parameter"),
    ([*UNLABELLED_TSV, "--config.data.path=TRAIN_TSV"],
     "data.objective='classification' needs data.labels"),
], ids=["masked_lm_on_decoder", "init_from_missing", "freeze_matches_nothing", "classification_without_labels"])
def test_bad_encoder_input_fails_in_one_line(args, message, tmp_path):
    train_tsv = tmp_path / "train.tsv"
    write_tsv(train_tsv, 20, seed=3)
    args = [arg.replace("TRAIN_TSV", str(train_tsv)) for arg in args]
    result = run_module("llm_jax.train", *QUICK, f"--workdir={tmp_path / 'run'}", *args)
    assert_one_line_error(result, message)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_unknown_tsv_label_is_named_with_file_and_line(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence\tlabel\nthe list\t0\nclass object\t2\n")
    result = run_module("llm_jax.train", *QUICK, *CLASSIFICATION, f"--workdir={tmp_path / 'run'}",
                        f"--config.data.path={bad}")
    assert_one_line_error(result, f"{bad}:3: unknown label '2'")


def test_init_from_a_decoder_work_directory_is_a_family_mismatch(pretrained, tmp_path):
    """The source's family is read from its config.json: a copy of the pretrained run relabelled as a decoder
    stands in for a decoder work directory (a real one would cost a training run)."""
    decoder = tmp_path / "decoder"
    shutil.copytree(pretrained, decoder)
    saved = json.loads((decoder / "config.json").read_text())
    saved["model_config"]["family"] = "decoder"
    (decoder / "config.json").write_text(json.dumps(saved))
    result = run_module("llm_jax.train", *QUICK, *MLM, f"--workdir={tmp_path / 'run'}",
                        f"--config.train.init_from={decoder}")
    assert_one_line_error(result, f"train.init_from={decoder} holds a model of family 'decoder'; this run's model.family is 'encoder'")
