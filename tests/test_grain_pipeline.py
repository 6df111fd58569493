"""The Grain pipeline: deterministic, disjoint per-process shards that cover each epoch, exact resume of the
iterator mid-epoch (in process and with worker processes), packed rows, whole-split evaluation, mixtures,
bad input and the vocabulary check."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from llm_jax import config as config_lib
from llm_jax.errors import ConfigError
from llm_jax.data.pipeline import build_data
from reference_packing import segment_positions

SEQ_LEN, BATCH = 16, 4
NUM_DOCS = 60


def _config(path, **data):
    config = config_lib.default_config()
    config.data.update(path=str(path), seq_len=SEQ_LEN, pipeline="grain", split_by="line", tokenizer="char")
    config.data.update(**data)
    config.train.update(batch_size=BATCH)
    return config


@pytest.fixture
def numbered_docs(tmp_path):
    """NUM_DOCS one-line documents "<id>;" padded with letters, so the token stream names its documents."""
    rng = np.random.default_rng(0)
    lines = [f"{i};" + "".join(rng.choice(list("abcdefgh"), size=int(rng.integers(3, 30)))) for i in range(NUM_DOCS)]
    path = tmp_path / "docs.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def _stream_text(data, num_steps: int) -> str:
    """The shard's token stream: concat-and-split rows are disjoint consecutive chunks of seq_len + 1 tokens."""
    chunk = data.train.next_chunk(num_steps)
    rows = np.concatenate([chunk["inputs"][..., :1], chunk["targets"]], axis=-1).reshape(-1, SEQ_LEN + 1)
    return data.tokenizer.decode(rows.reshape(-1))


def _doc_ids(text: str) -> list[int]:
    """The ids of the documents in the order they start in `text` (the stream starts with a whole document)."""
    ids = []
    for part in text.split(";")[:-1]:
        digits = "".join(c for c in reversed(part) if c.isdigit())[::-1]
        if digits:
            ids.append(int(digits))
    return ids


def _assert_chunks_equal(first, second):
    assert first.keys() == second.keys()
    for key in first:
        np.testing.assert_array_equal(first[key], second[key], err_msg=key)


def test_same_seed_same_batches_other_seed_other_batches(numbered_docs):
    first, second = build_data(_config(numbered_docs)), build_data(_config(numbered_docs))
    _assert_chunks_equal(first.train.next_chunk(5), second.train.next_chunk(5))
    other = build_data(_config(numbered_docs, seed=1))
    assert not np.array_equal(build_data(_config(numbered_docs)).train.next_chunk(5)["inputs"],
                              other.train.next_chunk(5)["inputs"])


def test_process_shards_are_disjoint_and_cover_each_epoch(numbered_docs):
    """Two processes (rows 0-1 and 2-3 of each batch) read disjoint document shards whose union is the whole
    train split (the first 90% of the records), and every epoch is reshuffled."""
    train_ids = set(range(NUM_DOCS - round(NUM_DOCS * 0.1)))
    seen = []
    for rows in ((0, BATCH // 2), (BATCH // 2, BATCH)):
        data = build_data(_config(numbered_docs), rows=rows)
        ids = _doc_ids(_stream_text(data, 60))
        shard_size = len(train_ids) // 2
        epochs = [ids[i * shard_size:(i + 1) * shard_size] for i in range(3)]
        assert len(set(epochs[1])) == shard_size and set(epochs[1]) == set(epochs[2])
        assert epochs[1] != epochs[2], "each epoch is shuffled anew"
        seen.append(set(epochs[1]))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == train_ids


def test_processes_holding_the_same_rows_read_the_same_shard(numbered_docs):
    whole = build_data(_config(numbered_docs)).train.next_chunk(3)
    again = build_data(_config(numbered_docs), rows=(0, BATCH)).train.next_chunk(3)
    _assert_chunks_equal(whole, again)


@pytest.mark.parametrize("num_workers, read_threads", [(0, 0), (0, 4), (1, 0)])
def test_resume_mid_epoch_gives_exactly_the_uninterrupted_batches(numbered_docs, num_workers, read_threads):
    config = _config(numbered_docs, num_workers=num_workers, read_threads=read_threads, packing="first_fit")
    uninterrupted = build_data(config)
    uninterrupted.train.next_chunk(7)  # mid-epoch: 54 documents are about 25 batches
    state = json.loads(json.dumps(uninterrupted.train.get_state()))  # as the checkpoint stores it
    expected = uninterrupted.train.next_chunk(6)
    resumed = build_data(config)
    resumed.train.set_state(state)
    _assert_chunks_equal(resumed.train.next_chunk(6), expected)
    uninterrupted.train.close()
    resumed.train.close()


@pytest.mark.parametrize("packing", ["concat_split", "first_fit"])
def test_packed_rows_restart_positions_and_mask_targets_across_documents(numbered_docs, packing):
    chunk = build_data(_config(numbered_docs, packing=packing)).train.next_chunk(10)
    segments = chunk["segment_ids"].reshape(-1, SEQ_LEN)
    positions = chunk["positions"].reshape(-1, SEQ_LEN)
    weights = chunk["weights"].reshape(-1, SEQ_LEN)
    for row_segments, row_positions, row_weights in zip(segments, positions, weights):
        real = row_segments > 0
        np.testing.assert_array_equal(row_positions[real], segment_positions(row_segments)[real])
        # a target counts exactly when it is a real token of the same document as its input (the last
        # target's document is not visible in the row)
        same_next = (row_segments[1:] == row_segments[:-1]) & real[:-1]
        np.testing.assert_array_equal(row_weights[:-1], same_next.astype(np.float32))
        assert np.all(row_weights[~real] == 0)
    if packing == "first_fit":
        assert np.any(segments == 0), "first-fit rows are padded with segment 0"


def test_without_separate_documents_rows_have_no_segments(numbered_docs):
    chunk = build_data(_config(numbered_docs, separate_documents=False)).train.next_chunk(2)
    assert set(chunk) == {"inputs", "targets", "weights"} and np.all(chunk["weights"] == 1)


def test_whole_split_evaluation_is_padded_and_repeatable(numbered_docs):
    data = build_data(_config(numbered_docs, eval_path=str(numbered_docs), eval_split="test"))
    batches = list(data.eval_batches("test", -1))
    chars = len(numbered_docs.read_text().replace("\n", ""))
    rows = -(-chars // (SEQ_LEN + 1))
    assert len(batches) == -(-rows // BATCH)
    assert all(batch["inputs"].shape == (BATCH, SEQ_LEN) for batch in batches)
    again = list(data.eval_batches("test", -1))
    for first, second in zip(batches, again, strict=True):
        _assert_chunks_equal(first, second)
    extra = list(data.eval_batches("test", len(batches) + 2))
    assert all(np.all(batch["weights"] == 0) for batch in extra[len(batches):]), "past the end: zero weight"
    with pytest.raises(ValueError, match="unknown split"):
        next(data.eval_batches("nope", 1))


def test_mixture_samples_documents_by_weight(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("\n".join("a" * 20 for _ in range(30)))
    b.write_text("\n".join("b" * 20 for _ in range(30)))
    config = _config(a, tokenizer="byte", mixture=({"path": str(a), "weight": 3.0}, {"path": str(b), "weight": 1.0}))
    tokens = build_data(config).train.next_chunk(100)["inputs"]
    share_a = np.mean(tokens == ord("a")) / (np.mean(tokens == ord("a")) + np.mean(tokens == ord("b")))
    assert share_a == pytest.approx(0.75, abs=0.05)


def test_unknown_mixture_key_is_rejected_when_the_config_is_validated(tmp_path):
    config = _config(tmp_path / "a.txt", mixture=({"paht": "x", "weight": 1.0},))
    with pytest.raises(ConfigError, match=r"data.mixture\[0\] has unknown keys \['paht'\]"):
        config_lib.validate(config, 1)


@pytest.mark.parametrize("source, content, extra, message", [
    ("jsonl", '{"text": "ok"}\n{"body": "x"}\n', {}, "bad.txt:2: the JSON object lacks the field 'text'"),
    ("tsv", "text\tlabel\nfine\tpos\nbroken\n", {"label_column": "label", "labels": ("pos", "neg")},
     "bad.txt:3: 1 columns, expected 2"),
    ("tsv", "text\tlabel\nfine\tpos\nodd\tmaybe\n", {"label_column": "label", "labels": ("pos", "neg")},
     "bad.txt:3: unknown label 'maybe'"),
    ("text_file", b"fine\n\xff\xfe oops\n", {}, "bad.txt:2: invalid UTF-8"),
    ("text_file", "", {}, "bad.txt:1: the file is empty"),
])
def test_bad_input_names_file_and_line_or_is_skipped_and_counted(tmp_path, source, content, extra, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        build_data(_config(path, source=source, **extra))
    if source != "text_file" or content:
        good = tmp_path / "good.txt"  # the same format, no bad record
        good.write_text({"jsonl": "".join(f'{{"text": "line {i}"}}\n' for i in range(20)),
                         "tsv": "text\tlabel\n" + "".join(f"line {i}\tpos\n" for i in range(20)),
                         "text_file": "".join(f"line {i}\n" for i in range(20))}[source])
        data = build_data(_config(path, source=source, skip_bad_records=True, eval_path=str(good), **extra))
        assert data.skipped_records == 1


def test_tokenizer_vocabulary_must_match_model_vocab_size(numbered_docs, tmp_path):
    from llm_jax.training.run import build_run

    config = _config(numbered_docs)
    config.model.update(num_layers=1, d_model=16, num_heads=2, max_len=SEQ_LEN, vocab_size=999)
    config.mesh.update(data=1)
    with pytest.raises(ConfigError, match="model.vocab_size=999 does not match the char tokenizer's"):
        build_run(config, str(tmp_path / "run"), devices=jax.devices()[:1])


def test_too_few_records_to_hold_out_names_the_keys(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("a single line")
    with pytest.raises(ConfigError, match="data.eval_path"):
        build_data(_config(path))


def test_prepared_dataset_is_reused_and_prepared_again_when_the_file_changes(numbered_docs):
    data_dir = os.environ["TFDS_DATA_DIR"]
    build_data(_config(numbered_docs))
    name_dir = os.path.join(data_dir, "text_file_docs")
    before = set(os.listdir(name_dir))
    build_data(_config(numbered_docs))
    assert set(os.listdir(name_dir)) == before
    numbered_docs.write_text(numbered_docs.read_text() + "999;zz\n")
    build_data(_config(numbered_docs))
    assert len(set(os.listdir(name_dir)) - before) == 1, "a changed file is prepared into a new fingerprint"
