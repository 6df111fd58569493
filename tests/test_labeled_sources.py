"""Labeled records from local files: JSONL classification and token labeling, CoNLL column files."""

from __future__ import annotations

import json
import pickle
import re
import sys

import pytest

from conftest import import_or_fail  # noqa: E402

import_or_fail("tensorflow_datasets")
import_or_fail("array_record")

from llm_jax.config import ConfigError, default_config  # noqa: E402
from llm_jax.data.sources import source_splits  # noqa: E402


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def _jsonl(path, objects):
    return _write(path, "".join(json.dumps(o) + "\n" for o in objects))


def _data(tmp_path, **keys):
    data = default_config().data
    data.tfds_data_dir = str(tmp_path / "tfds")
    for key, value in keys.items():
        data[key] = value
    return data


def _records(source):
    return [source[i] for i in range(len(source))]


@pytest.fixture(autouse=True)
def _no_tensorflow():
    yield
    assert "tensorflow" not in sys.modules, "preparing or reading labeled records imported TensorFlow"


# ----------------------------------------------------------------------------- JSONL classification


def test_jsonl_classification_pairs_round_trip(tmp_path):
    train = _jsonl(tmp_path / "train.jsonl", [
        {"premise": "A man sleeps.", "hypothesis": "Nobody sleeps.", "gold": "contradiction", "id": 1},
        {"premise": "A dog runs.", "hypothesis": "An animal moves.", "gold": "entailment"},
    ])
    dev = _jsonl(tmp_path / "dev.jsonl", [{"premise": "Rain.", "hypothesis": "Wet streets.", "gold": "neutral"}])
    data = _data(tmp_path, source="jsonl", path=train, eval_path=dev, text_field="premise",
                 text_b_field="hypothesis", label_field="gold", labels=("entailment", "neutral", "contradiction"))
    splits = source_splits(data)
    assert _records(splits.splits["train"]) == [
        {"text": "A man sleeps.", "text_b": "Nobody sleeps.", "label": 2},
        {"text": "A dog runs.", "text_b": "An animal moves.", "label": 0},
    ]
    validation = splits.splits["validation"]
    assert _records(validation) == [{"text": "Rain.", "text_b": "Wet streets.", "label": 1}]
    assert splits.text_of(validation[0]) == "Rain.\nWet streets."
    assert pickle.loads(pickle.dumps(validation))[0] == validation[0]  # Grain workers get the source pickled
    assert splits.skipped_records == 0


def test_jsonl_int_labels_compare_as_strings(tmp_path):
    path = _jsonl(tmp_path / "sst.jsonl", [{"text": "great", "label": 1}, {"text": "awful", "label": "0"}])
    splits = source_splits(_data(tmp_path, source="jsonl", path=path, label_field="label", labels=("0", "1")))
    assert _records(splits.splits["train"]) == [{"text": "great", "label": 1}, {"text": "awful", "label": 0}]


def test_jsonl_bad_label_names_file_line(tmp_path):
    path = _jsonl(tmp_path / "bad.jsonl", [{"text": "a", "label": "yes"}, {"text": "b", "label": "maybe"}])
    data = _data(tmp_path, source="jsonl", path=path, label_field="label", labels=("yes", "no"))
    message = rf"{re.escape(path)}:2: label 'maybe' is not one of \['yes', 'no'\] \(data.labels\)"
    with pytest.raises(ConfigError, match=message):
        source_splits(data)
    data.skip_bad_records = True
    splits = source_splits(data)
    assert _records(splits.splits["train"]) == [{"text": "a", "label": 0}]
    assert splits.skipped_records == 1


def test_jsonl_label_field_needs_labels(tmp_path):
    path = _jsonl(tmp_path / "x.jsonl", [{"text": "a", "label": "yes"}])
    with pytest.raises(ConfigError, match="data.labels is empty"):
        source_splits(_data(tmp_path, source="jsonl", path=path, label_field="label"))


# ----------------------------------------------------------------------------- CoNLL


CONLL = """-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC
call NN I-NP O

# text = Peter Blackburn
Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER
#tag NN I-NP O
"""
NER_LABELS = ("O", "B-ORG", "B-MISC", "B-PER", "I-PER")


def test_conll_sentences(tmp_path):
    path = _write(tmp_path / "ner.conll", CONLL)
    splits = source_splits(_data(tmp_path, source="conll", path=path, labels=NER_LABELS))
    assert _records(splits.splits["train"]) == [
        {"words": ["EU", "rejects", "German", "call"], "word_labels": [1, 0, 2, 0], "text": "EU rejects German call"},
        {"words": ["Peter", "Blackburn", "#tag"], "word_labels": [3, 4, 0], "text": "Peter Blackburn #tag"},
    ]
    assert splits.text_of(splits.splits["train"][1]) == "Peter Blackburn #tag"
    chunks = source_splits(_data(tmp_path, source="conll", path=path, labels=("B-NP", "B-VP", "I-NP"),
                                 conll_columns=(0, 2)))
    assert [r["word_labels"] for r in _records(chunks.splits["train"])] == [[0, 1, 0, 2], [0, 2, 2]]


def test_conll_unknown_tag_fails_or_skips_the_sentence(tmp_path):
    path = _write(tmp_path / "ner.conll", CONLL.replace("Blackburn NNP I-NP I-PER", "Blackburn NNP I-NP I-XYZ"))
    data = _data(tmp_path, source="conll", path=path, labels=NER_LABELS)
    with pytest.raises(ConfigError, match=rf"{re.escape(path)}:10: tag 'I-XYZ' is not one of .*\(data.labels\)"):
        source_splits(data)
    data.skip_bad_records = True
    splits = source_splits(data)
    assert [r["words"] for r in _records(splits.splits["train"])] == [["EU", "rejects", "German", "call"]]
    assert splits.skipped_records == 1


def test_conll_config_errors(tmp_path):
    path = _write(tmp_path / "ner.conll", "EU NNP B-ORG\nrejects O\n")
    with pytest.raises(ConfigError, match=rf"{re.escape(path)}:2: 2 columns, data.conll_columns=\[2, -1\]"):
        source_splits(_data(tmp_path, source="conll", path=path, labels=NER_LABELS, conll_columns=(2, -1)))
    with pytest.raises(ConfigError, match="data.labels is empty"):
        source_splits(_data(tmp_path, source="conll", path=path))
    with pytest.raises(ConfigError, match="data.conll_columns"):
        source_splits(_data(tmp_path, source="conll", path=path, labels=NER_LABELS, conll_columns=(0,)))


# ----------------------------------------------------------------------------- JSONL token labeling


def test_jsonl_token_labeling(tmp_path):
    path = _jsonl(tmp_path / "ner.jsonl", [
        {"tokens": ["EU", "rejects", "German"], "ner_tags": ["B-ORG", "O", "B-MISC"], "id": "0"},
        {"tokens": ["Peter"], "ner_tags": [3]},  # ints compare as strings with data.labels
    ])
    data = _data(tmp_path, source="jsonl", path=path, words_field="tokens", tags_field="ner_tags",
                 labels=("O", "B-ORG", "B-MISC", "3"))
    splits = source_splits(data)
    assert _records(splits.splits["train"]) == [
        {"words": ["EU", "rejects", "German"], "word_labels": [1, 0, 2], "text": "EU rejects German"},
        {"words": ["Peter"], "word_labels": [3], "text": "Peter"},
    ]


def test_jsonl_token_labeling_errors(tmp_path):
    path = _jsonl(tmp_path / "ner.jsonl", [{"words": ["a", "b"], "tags": ["O", "O"]},
                                          {"words": ["a", "b"], "tags": ["O"]}])
    data = _data(tmp_path, source="jsonl", path=path, labels=("O",))
    with pytest.raises(ConfigError, match=rf"{re.escape(path)}:2: 2 words \('words'\) but 1 tags \('tags'\)"):
        source_splits(data)
    no_words = _jsonl(tmp_path / "text.jsonl", [{"text": "a b"}])
    data.path = no_words
    with pytest.raises(ConfigError, match=rf"{re.escape(no_words)}:1: the JSON object lacks the field 'words'"):
        source_splits(data)
    data.text_b_field = "other"
    with pytest.raises(ConfigError, match="token-labeling source"):
        source_splits(data)
