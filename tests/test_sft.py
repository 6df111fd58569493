"""Supervised fine-tuning (data.objective=sft): loss weights on response tokens only, pairs packed apart, pair
sources and their errors, and the :quick experiment end to end."""

from __future__ import annotations

import json
import math

import grain
import numpy as np
import pytest

from conftest import metrics, run_module
from llm_jax import config as config_lib
from llm_jax.data.pairs import INPUTS, TARGETS, python_docs_qa_pairs
from llm_jax.data.sources import SOURCES
from llm_jax.data.tokenizers import CharTokenizer
from llm_jax.errors import ConfigError
from llm_jax.tasks import build_task
from llm_jax.tasks.base import RowContext
from llm_jax.tasks.sft import truncate_pair

pytestmark = pytest.mark.slow  # run with --slow (README); the default suite stays under 15 min

EOS = 1
PAIRS = [("ab", "XYZ"), ("c", "W"), ("defgh", "UVWXYZ"), ("ij", "abcdefghijkl"), ("k", "mn")]


class OrdTokenizer:
    """Each character -> its code point; id 1 is EOS (no text here contains chr(1))."""

    kind = "ord"
    special_ids = {"eos": EOS}

    def encode(self, text: str) -> np.ndarray:
        return np.array([ord(c) for c in text], np.int32)


def _config(**data):
    config = config_lib.default_config()
    config.data.update({"objective": "sft", "source": "pairs_jsonl", "seq_len": 8, "packing": "first_fit",
                        "packing_bins": 4, **data})
    return config


def _rows(config, pairs=PAIRS, tokenizer=OrdTokenizer()) -> list[dict[str, np.ndarray]]:
    records = grain.MapDataset.source([{INPUTS: p, TARGETS: r} for p, r in pairs])
    context = RowContext(tokenizer, config.data, grain.ReadOptions(), training=False)
    return list(build_task(config).rows(records, context))


def _expected_pairs() -> list[tuple[list[int], list[int]]]:
    """(tokens, 1 on response tokens) of each of PAIRS at data.seq_len=8 (9 tokens at most), worked out by hand."""
    def ids(text):
        return [ord(c) for c in text]

    return [(ids("abXYZ") + [EOS], [0, 0, 1, 1, 1, 1]),
            (ids("cW") + [EOS], [0, 1, 1]),
            (ids("ghUVWXYZ") + [EOS], [0, 0] + [1] * 7),  # 5 + 7 > 9: the prompt loses "def"
            (ids("jabcdefgh"), [0] + [1] * 8),  # 2 + 13 > 9: one prompt token kept, then the response cut (no EOS)
            (ids("kmn") + [EOS], [0, 1, 1, 1])]


def _row_tokens(row: dict[str, np.ndarray]) -> list[int]:
    """The seq_len + 1 packed tokens of a row (0 = padding: no pair has a token 0)."""
    return row["inputs"].tolist() + [int(row["targets"][-1])]


def _check_row(row: dict[str, np.ndarray], labels: list[tuple[int, int, int]]) -> None:
    """The row against (is_response, pair index or -1 on padding, offset in the pair's piece) per token: a loss
    exactly on targets that are response tokens of the input's pair; segments and positions per pair."""
    expected = [float(b[0] == 1 and a[1] == b[1] != -1) for a, b in zip(labels, labels[1:])]
    assert row["weights"].tolist() == expected, (_row_tokens(row), row["weights"].tolist())
    pairs = [label[1] for label in labels[:-1]]
    assert all((s == t) == (p == q) for s, p in zip(row["segment_ids"], pairs)
               for t, q in zip(row["segment_ids"], pairs))
    assert [int(s == 0) for s in row["segment_ids"]] == [int(p == -1) for p in pairs]
    assert [position for position, p in zip(row["positions"], pairs) if p != -1] == [
        label[2] for label in labels[:-1] if label[1] != -1]


def test_truncation_cuts_the_prompt_from_the_left_then_the_response():
    prompt, response = np.arange(5), np.arange(10, 17)
    assert [a.tolist() for a in truncate_pair(prompt, response, 20)] == [list(range(5)), list(range(10, 17))]
    assert [a.tolist() for a in truncate_pair(prompt, response, 9)] == [[3, 4], list(range(10, 17))]
    assert [a.tolist() for a in truncate_pair(prompt, response, 4)] == [[4], [10, 11, 12]]
    assert [a.tolist() for a in truncate_pair(np.arange(0), response, 4)] == [[], [10, 11, 12, 13]]


def test_first_fit_rows_hold_whole_pairs_with_loss_on_the_responses_only():
    expected, found = _expected_pairs(), []
    for row in _rows(_config()):
        tokens, labels, at = _row_tokens(row), [], 0
        while at < len(tokens) and tokens[at] != 0:  # the row is whole pairs, then padding
            index = next(i for i, (pair, _) in enumerate(expected) if tokens[at:at + len(pair)] == pair)
            found.append(index)
            labels += [(mask, index, offset) for offset, mask in enumerate(expected[index][1])]
            at += len(expected[index][0])
        labels += [(0, -1, 0)] * (len(tokens) - at)
        _check_row(row, labels)
    assert sorted(found) == list(range(len(PAIRS)))  # one pass over the pairs: each exactly once


def test_concat_split_continues_a_pair_in_the_next_row_as_a_new_segment():
    order = [1, 2, 3, 4, 0]  # 3 + 9 tokens: pair 2 straddles rows 0 and 1
    expected = _expected_pairs()
    stream = [(token, mask, index) for index in order for token, mask in zip(*expected[index])]
    rows = _rows(_config(packing="concat_split"), pairs=[PAIRS[index] for index in order])
    length = 9
    for number, row in enumerate(rows[:len(stream) // length]):
        piece = stream[number * length:(number + 1) * length]
        assert _row_tokens(row) == [token for token, _, _ in piece]
        labels, previous, offset = [], None, 0
        for _, mask, index in piece:  # offsets restart per pair and per row (a cut pair's rest is a new segment)
            offset = offset + 1 if index == previous else 0
            labels.append((mask, index, offset))
            previous = index
        _check_row(row, labels)
    assert rows[0]["segment_ids"].tolist() == [1] * 3 + [2] * 5 and rows[1]["positions"][0] == 0


def test_a_pair_packed_after_another_is_predicted_as_if_alone():
    """Segment ids and positions reach the model: no attention crosses pairs and positions restart."""
    import flax.linen as nn
    import jax

    from configs.model_sizes import apply_model_size
    from llm_jax.models.families import build_model
    from llm_jax.models.model_config import build_model_config

    config = _config()
    apply_model_size(config, "test")
    config.model.max_len = 8
    task = build_task(config)
    model = build_model(build_model_config(config.model, 128, {"data": 1, "fsdp": 1, "tensor": 1}, task.heads()))
    packed = _rows(config, pairs=[PAIRS[1], PAIRS[0]])[0]  # "cW" EOS, then "abXYZ" EOS: 3 + 6 tokens
    alone = _rows(config, pairs=[PAIRS[0]])[0]
    assert packed["segment_ids"].tolist() == [1, 1, 1, 2, 2, 2, 2, 2]
    batch = {key: np.stack([packed[key], alone[key]]) for key in packed}
    params = nn.unbox(model.init(jax.random.key(0), **task.model_inputs(batch))["params"])
    logits = np.asarray(model.apply({"params": params}, **task.model_inputs(batch)).heads["lm"])
    np.testing.assert_allclose(logits[0, 3:], logits[1, :5], atol=1e-5)
    assert packed["weights"].tolist()[3:] == alone["weights"].tolist()[:5] == [0.0, 1.0, 1.0, 1.0, 1.0]


def test_bad_pairs_and_settings_are_named(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n" + json.dumps({"prompt": "only"}) + "\n")
    config = _config(path=str(path))
    with pytest.raises(ConfigError, match=rf"{path}:2: the JSON object lacks the field 'response'.*skip_bad_records"):
        SOURCES.get("pairs_jsonl")(config.data)
    config.data.skip_bad_records = True
    source = SOURCES.get("pairs_jsonl")(config.data)
    assert source.skipped_records == 1 and list(source.splits["train"]) == [{INPUTS: "a", TARGETS: "b"}]
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("question\tanswer\nq1\ta1\nq2\ta2\textra\n")
    config = _config(source="pairs_tsv", path=str(tsv), pair_fields=("question", "answer"))
    with pytest.raises(ConfigError, match=rf"{tsv}:3: 3 columns, expected 2"):
        SOURCES.get("pairs_tsv")(config.data)

    with pytest.raises(ConfigError, match="has none: use data.tokenizer=sentencepiece"):
        _rows(_config(), tokenizer=CharTokenizer.fit("abc"))
    for changes, message in [({"model.family": "encoder"}, "runs on model.family in \\['decoder'\\]"),
                             ({"data.source": "jsonl"}, "use one of \\['pairs_jsonl'"),
                             ({"data.pipeline": "windows"}, "set data.pipeline=grain"),
                             ({"data.sft_template": "Q: {question}"}, "data.sft_template='Q: {question}'"),
                             ({"data.pair_fields": ("prompt",)}, None)]:
        config = config_lib.override(_config(), changes.items())
        if message is None:
            with pytest.raises(ConfigError, match="data.pair_fields"):
                SOURCES.get("pairs_jsonl")(config.data)
        else:
            with pytest.raises(ConfigError, match=message):
                build_task(config)


def test_template_and_python_docs_qa_pairs():
    rows = _rows(_config(sft_template="<{prompt}>"), pairs=[("a", "b")])
    assert _row_tokens(rows[0])[:6] == [ord(c) for c in "<a>b"] + [EOS, 0]
    assert rows[0]["weights"].tolist()[:5] == [0.0, 0.0, 1.0, 1.0, 0.0]  # "b" and EOS after the templated prompt
    pairs = python_docs_qa_pairs()
    assert len(pairs) > 100 and len({p["prompt"] for p in pairs}) == len(pairs)
    assert {"prompt": 'Q: Tell me about the "with" statement.\nA:'}.items() <= next(
        p for p in pairs if '"with" statement' in p["prompt"]).items()


def test_quick_experiment_trains_on_the_responses(tmp_path):
    result = run_module("llm_jax.train", "--config=experiments/sft_python_docs.py:quick", f"--workdir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    records = metrics(tmp_path)
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert losses[-1] < losses[0], losses
    evaluation = [r for r in records if "eval/loss" in r][-1]
    assert evaluation["step"] == 20 and math.isfinite(evaluation["eval/loss"]) and evaluation["eval/tokens"] > 0
    assert {"eval/perplexity", "eval/token_accuracy"} <= set(evaluation)
