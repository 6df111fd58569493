"""Sequence packing: token conservation, segment/position layout, first-fit choice, and the model-level
property that a packed row gives each example exactly the logits it gets alone."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax import config as config_lib
from llm_jax.data import packing
from llm_jax.decoding.sampling import lm_logits
from llm_jax.models.families import build_model
from llm_jax.models.model_config import build_model_config

VOCAB = 50
ONE_DEVICE = {"data": 1, "fsdp": 1, "tensor": 1}
EOS = 0


def _docs(seed: int, count: int, max_len: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, VOCAB, size=int(rng.integers(1, max_len + 1))).astype(np.int32) for _ in range(count)]


# ----------------------------------------------------------------------------- concat_and_split


@pytest.mark.parametrize("eos_id", [EOS, None])
@pytest.mark.parametrize("seq_len", [1, 7, 16])
def test_concat_and_split_reproduces_the_stream(eos_id, seq_len):
    docs = _docs(0, 40, 20)
    stream = np.concatenate([np.append(d, eos_id) if eos_id is not None else d for d in docs])
    rows = list(packing.concat_and_split(docs, seq_len, eos_id))
    chunk = seq_len + 1
    assert len(rows) == len(stream) // chunk
    rebuilt = []
    for row in rows:
        assert set(row) == {"inputs", "targets", "weights"}
        assert row["inputs"].shape == row["targets"].shape == row["weights"].shape == (seq_len,)
        assert row["inputs"].dtype == row["targets"].dtype == np.int32 and row["weights"].dtype == np.float32
        np.testing.assert_array_equal(row["inputs"][1:], row["targets"][:-1])  # shift by one
        np.testing.assert_array_equal(row["weights"], 1.0)
        rebuilt.append(np.append(row["inputs"], row["targets"][-1]))
    # Disjoint chunks of seq_len + 1 in order: nothing lost or duplicated except the short tail.
    np.testing.assert_array_equal(np.concatenate(rebuilt), stream[:len(rows) * chunk])


def test_concat_and_split_remainder_is_padded_with_zero_weight():
    docs = [np.arange(1, 12, dtype=np.int32)]  # 11 tokens + eos = 12 = one chunk of 9 and a tail of 3
    rows = list(packing.concat_and_split(docs, 8, EOS, drop_remainder=False, with_segments=True))
    assert len(rows) == 2
    tail = rows[1]
    np.testing.assert_array_equal(tail["inputs"], [10, 11, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(tail["targets"], [11, EOS, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(tail["weights"], [1, 1, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(tail["segment_ids"], [1, 1, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(tail["positions"], [0, 1, 0, 0, 0, 0, 0, 0])


def test_concat_and_split_segments_and_cross_document_mask():
    docs = [np.array([1, 2, 3]), np.array([4, 5]), np.array([6, 7, 8, 9, 10, 11])]
    # stream: 1 2 3 E 4 5 E 6 7 8 9 10 11 E  (14 tokens) -> chunks of 7: [1 2 3 E 4 5 E] [6 7 8 9 10 11 E]
    rows = list(packing.concat_and_split(docs, 6, EOS, with_segments=True, mask_cross_document=True))
    assert len(rows) == 2
    first, second = rows
    np.testing.assert_array_equal(first["inputs"], [1, 2, 3, EOS, 4, 5])
    np.testing.assert_array_equal(first["targets"], [2, 3, EOS, 4, 5, EOS])
    np.testing.assert_array_equal(first["segment_ids"], [1, 1, 1, 1, 2, 2])
    np.testing.assert_array_equal(first["positions"], [0, 1, 2, 3, 0, 1])
    np.testing.assert_array_equal(first["weights"], [1, 1, 1, 0, 1, 1])  # EOS -> 4 crosses documents
    np.testing.assert_array_equal(second["segment_ids"], 1)
    np.testing.assert_array_equal(second["positions"], np.arange(6))
    np.testing.assert_array_equal(second["weights"], 1)

    # Without eos the last token of a document predicts the next one's first: that target is masked.
    rows = list(packing.concat_and_split(docs, 4, None, with_segments=True, mask_cross_document=True))
    np.testing.assert_array_equal(rows[0]["inputs"], [1, 2, 3, 4])
    np.testing.assert_array_equal(rows[0]["weights"], [1, 1, 0, 1])
    np.testing.assert_array_equal(rows[0]["segment_ids"], [1, 1, 1, 2])
    np.testing.assert_array_equal(rows[0]["positions"], [0, 1, 2, 0])
    # A row starting in the middle of a document starts at segment 1, position 0.
    np.testing.assert_array_equal(rows[1]["inputs"], [6, 7, 8, 9])
    np.testing.assert_array_equal(rows[1]["segment_ids"], [1, 1, 1, 1])
    np.testing.assert_array_equal(rows[1]["positions"], [0, 1, 2, 3])

    # Segments without masking keep every weight.
    rows = list(packing.concat_and_split(docs, 6, EOS, with_segments=True))
    np.testing.assert_array_equal(rows[0]["weights"], 1)


def test_concat_and_split_is_deterministic_and_lazy():
    docs = _docs(1, 30, 15)
    a = list(packing.concat_and_split(docs, 8, EOS, with_segments=True))
    b = list(packing.concat_and_split(iter(docs), 8, EOS, with_segments=True))
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])

    def endless():
        while True:
            yield np.arange(1, 6)
    it = packing.concat_and_split(endless(), 8, EOS)
    assert next(it)["inputs"].shape == (8,)


# ----------------------------------------------------------------------------- first_fit_pack


def _check_packed(rows, examples, seq_len, group_keys=("inputs", "targets", "weights"), prefix=""):
    """Every token of every example exactly once, inside one segment, in order; layout invariants."""
    seg_key, pos_key = f"{prefix}segment_ids", f"{prefix}positions"
    found = []
    for row in rows:
        seg, pos = row[seg_key], row[pos_key]
        assert seg.shape == pos.shape == (seq_len,)
        for key in group_keys:
            assert row[key].shape == (seq_len,)  # bins never exceed seq_len
        pad = seg == 0
        # Padding is a suffix, all zero, weight zero, position zero.
        if pad.any():
            assert pad[np.argmax(pad):].all()
        for key in group_keys:
            np.testing.assert_array_equal(row[key][pad], 0)
        np.testing.assert_array_equal(pos[pad], 0)
        ids = seg[~pad]
        assert list(np.unique(ids)) == list(range(1, ids.max() + 1)) if len(ids) else True
        assert (np.diff(ids) >= 0).all()  # segments are contiguous, numbered in order
        for s in range(1, (ids.max() if len(ids) else 0) + 1):
            in_seg = seg == s
            np.testing.assert_array_equal(pos[in_seg], np.arange(in_seg.sum()))  # restart at 0
            found.append({key: row[key][in_seg] for key in group_keys})
    assert len(found) == len(examples)
    # Match segments to examples as multisets (packing reorders examples).
    def signature(ex):
        return tuple(tuple(np.asarray(ex[key]).tolist()) for key in group_keys)
    assert sorted(map(signature, found)) == sorted(map(signature, examples))


@pytest.mark.parametrize("max_pending", [1, 3, 64])
def test_first_fit_pack_keeps_every_token_once(max_pending):
    seq_len = 16
    examples = [packing.lm_example(doc, EOS) for doc in _docs(2, 60, seq_len)]  # lengths 1..16, all fit
    stats = {}
    rows = list(packing.first_fit_pack(examples, seq_len, max_pending=max_pending, stats=stats))
    _check_packed(rows, examples, seq_len)
    for row in rows:
        assert row["inputs"].dtype == np.int32 and row["weights"].dtype == np.float32
        assert row["segment_ids"].dtype == row["positions"].dtype == np.int32
        np.testing.assert_array_equal(row["weights"], row["segment_ids"] > 0)
    total = sum(len(ex["inputs"]) for ex in examples)
    assert stats["examples"] == 60 and stats["rows"] == len(rows) and stats["truncated"] == 0
    assert stats["tokens"] == total and stats["padding"] == len(rows) * seq_len - total
    assert len(rows) >= -(-total // seq_len)
    # Deterministic: same input order, same rows.
    again = list(packing.first_fit_pack(iter(examples), seq_len, max_pending=max_pending))
    assert len(again) == len(rows)
    for x, y in zip(rows, again):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def _ex(length: int, first: int) -> dict[str, np.ndarray]:
    tokens = np.arange(first, first + length, dtype=np.int32)
    return {"inputs": tokens, "targets": tokens + 100, "weights": np.ones(length, np.float32)}


def test_first_fit_choice_hand_worked():
    # seq_len 10, lengths 6, 5, 3, 4, 2, 1:
    #   6 -> bin A [6]; 5 -> B [5] (A has 4 left); 3 -> A [6,3] (first with room);
    #   4 -> B [5,4] (A has 1 left); 2 -> C [2] (A 1 left, B 1 left); 1 -> A [6,3,1] = 10 full -> emitted first.
    #   end: B [5,4], C [2] in opening order.
    lengths = [6, 5, 3, 4, 2, 1]
    examples = [_ex(n, 10 * i) for i, n in enumerate(lengths)]
    rows = list(packing.first_fit_pack(examples, 10))
    assert len(rows) == 3
    a, b, c = rows
    np.testing.assert_array_equal(a["inputs"], np.r_[np.arange(0, 6), np.arange(20, 23), [50]])
    np.testing.assert_array_equal(a["segment_ids"], [1] * 6 + [2] * 3 + [3])
    np.testing.assert_array_equal(a["positions"], [0, 1, 2, 3, 4, 5, 0, 1, 2, 0])
    np.testing.assert_array_equal(b["inputs"], np.r_[np.arange(10, 15), np.arange(30, 34), [0]])
    np.testing.assert_array_equal(b["segment_ids"], [1] * 5 + [2] * 4 + [0])
    np.testing.assert_array_equal(b["weights"], [1] * 9 + [0])
    np.testing.assert_array_equal(c["inputs"], [40, 41] + [0] * 8)
    np.testing.assert_array_equal(c["targets"], [140, 141] + [0] * 8)
    np.testing.assert_array_equal(c["positions"], [0, 1] + [0] * 8)
    _check_packed(rows, examples, 10)

    # max_pending=1: opening a second bin pushes out the oldest one.
    rows = list(packing.first_fit_pack(examples, 10, max_pending=1))
    # 6 -> A; 5 -> B, evict A[6]; 3 -> B[5,3]; 4 -> C, evict B[5,3]; 2 -> C[4,2]; 1 -> C[4,2,1]; end.
    assert [list(np.unique(r["segment_ids"][r["segment_ids"] > 0], return_counts=True)[1]) for r in rows] == \
        [[6], [5, 3], [4, 2, 1]]


def test_first_fit_too_long_truncates_or_raises():
    examples = [_ex(3, 0), _ex(12, 10), _ex(5, 30)]
    stats = {}
    rows = list(packing.first_fit_pack(examples, 8, stats=stats))
    assert stats["truncated"] == 1
    cut = [_ex(3, 0), _ex(8, 10), _ex(5, 30)]
    _check_packed(rows, cut, 8)
    with pytest.raises(ValueError, match="longer than seq_len"):
        list(packing.first_fit_pack(examples, 8, too_long="error"))
    with pytest.raises(ValueError, match="too_long"):
        list(packing.first_fit_pack(examples, 8, too_long="drop"))


def test_first_fit_rejects_inconsistent_examples():
    bad = {"inputs": np.arange(3), "targets": np.arange(4)}
    with pytest.raises(ValueError, match="different lengths"):
        list(packing.first_fit_pack([bad], 8))
    with pytest.raises(ValueError, match="reserved"):
        list(packing.first_fit_pack([{"inputs": np.arange(3), "segment_ids": np.ones(3)}], 8))
    with pytest.raises(ValueError, match="differ"):
        list(packing.first_fit_pack([_ex(2, 0), {"inputs": np.arange(2)}], 8))


def test_first_fit_seq2seq_groups():
    rng = np.random.default_rng(3)
    examples = []
    for i in range(25):
        n_in, n_out = int(rng.integers(1, 9)), int(rng.integers(1, 5))
        examples.append({"inputs": rng.integers(1, 50, n_in).astype(np.int32),
                         "targets": rng.integers(1, 50, n_out).astype(np.int32),
                         "weights": np.ones(n_out, np.float32)})
    groups = {"inputs": "inputs", "targets": "targets", "weights": "targets"}
    rows = list(packing.first_fit_pack(examples, {"inputs": 12, "targets": 6}, lengths_from=groups))
    for row in rows:
        assert row["inputs"].shape == (12,) and row["targets"].shape == row["weights"].shape == (6,)
        assert set(row) == {"inputs", "targets", "weights", "inputs_segment_ids", "inputs_positions",
                            "targets_segment_ids", "targets_positions"}
        # The same example has the same segment id in both groups.
        assert row["inputs_segment_ids"].max() == row["targets_segment_ids"].max()
    inputs_only = [{"inputs": ex["inputs"]} for ex in examples]
    targets_only = [{"targets": ex["targets"], "weights": ex["weights"]} for ex in examples]
    _check_packed([{"inputs": r["inputs"], "inputs_segment_ids": r["inputs_segment_ids"],
                    "inputs_positions": r["inputs_positions"]} for r in rows], inputs_only, 12,
                  group_keys=("inputs",), prefix="inputs_")
    _check_packed(rows, targets_only, 6, group_keys=("targets", "weights"), prefix="targets_")
    # Segment s of the inputs row and of the targets row come from the same example.
    pairs = set()
    for row in rows:
        for s in range(1, row["inputs_segment_ids"].max() + 1):
            pairs.add((tuple(row["inputs"][row["inputs_segment_ids"] == s].tolist()),
                       tuple(row["targets"][row["targets_segment_ids"] == s].tolist())))
    assert pairs == {(tuple(ex["inputs"].tolist()), tuple(ex["targets"].tolist())) for ex in examples}


# ----------------------------------------------------------------------------- batch


def test_batch_stacks_and_handles_remainder():
    rows = [{"inputs": np.full(4, i, np.int32), "weights": np.ones(4, np.float32)} for i in range(7)]
    batches = list(packing.batch(rows, 3, drop_remainder=True))
    assert len(batches) == 2 and batches[0]["inputs"].shape == (3, 4)
    np.testing.assert_array_equal(batches[1]["inputs"][:, 0], [3, 4, 5])
    batches = list(packing.batch(rows, 3, drop_remainder=False))
    assert [b["inputs"].shape[0] for b in batches] == [3, 3, 1]
    assert batches[0]["weights"].dtype == np.float32


# ----------------------------------------------------------------------------- model-level property


BATCH = 16  # every model call below runs on [BATCH, SEQ_LEN]: one compile per positional scheme and signature
SEQ_LEN = 32
_MODELS: dict = {}


def _tiny_model(positional: str):
    """(params, jitted logits function) of a tiny decoder, built and initialised once per positional scheme."""
    if positional not in _MODELS:
        config = config_lib.default_config()
        config.model.update(num_layers=2, d_model=32, num_heads=4, max_len=SEQ_LEN, positional=positional)
        model = build_model(build_model_config(config.model, VOCAB, ONE_DEVICE))
        params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, SEQ_LEN), jnp.int32))["params"])
        _MODELS[positional] = params, jax.jit(lm_logits(model))
    return _MODELS[positional]


def _logits(apply, params, *inputs_BT) -> np.ndarray:
    """The real-vocabulary logits of rows [N, SEQ_LEN] (tokens, then optional positions and segment ids), computed
    in one batch of BATCH rows (the first row repeats to fill it; rows never see each other)."""
    rows = len(inputs_BT[0])
    assert rows <= BATCH
    filled = [jnp.asarray(np.concatenate([x, np.repeat(x[:1], BATCH - rows, axis=0)])) for x in inputs_BT]
    return np.asarray(apply({"params": params}, *filled))[:rows, :, :VOCAB]


def _alone(apply, params, examples: list[np.ndarray]) -> list[np.ndarray]:
    """Each example's logits alone: its tokens at the start of a row of their own, default positions, no segment
    ids. The rest of the row is EOS padding, which the causal model cannot see from the example's positions
    (test_model checks causality for every positional scheme), so one [BATCH, SEQ_LEN] call serves all lengths."""
    rows = np.full((len(examples), SEQ_LEN), EOS, np.int32)
    for index, tokens in enumerate(examples):
        rows[index, :len(tokens)] = tokens
    logits = _logits(apply, params, rows)
    return [logits[index, :len(tokens)] for index, tokens in enumerate(examples)]


@pytest.mark.parametrize("positional", ["rope", "learned"])
def test_packed_row_logits_equal_each_example_alone(positional):
    params, apply = _tiny_model(positional)

    examples = [packing.lm_example(doc, EOS) for doc in _docs(4, 10, 14)]
    rows = list(packing.first_fit_pack(examples, SEQ_LEN, max_pending=2))
    packed = next(packing.batch(rows, len(rows), drop_remainder=False))
    logits = _logits(apply, params, packed["inputs"], packed["positions"], packed["segment_ids"])
    assert logits.shape[:2] == (len(rows), SEQ_LEN)
    assert max(r["segment_ids"].max() for r in rows) >= 2  # rows really hold several examples

    segments = [(b, s) for b, row in enumerate(rows) for s in range(1, row["segment_ids"].max() + 1)]
    alone = _alone(apply, params, [rows[b]["inputs"][rows[b]["segment_ids"] == s] for b, s in segments])
    for (b, s), alone_TV in zip(segments, alone):
        np.testing.assert_allclose(logits[b][rows[b]["segment_ids"] == s], alone_TV, rtol=1e-5, atol=1e-5,
                                   err_msg=f"{positional}: row {b}, segment {s}")
    assert len(segments) == len(examples)

    # concat_and_split rows with segments satisfy the same property (documents split across rows too).
    docs = _docs(5, 6, 20)
    split_rows = list(packing.concat_and_split(docs, SEQ_LEN, EOS, with_segments=True))
    row = split_rows[0]
    assert row["segment_ids"].max() >= 2
    logits = _logits(apply, params, row["inputs"][None], row["positions"][None], row["segment_ids"][None])
    ids = range(1, row["segment_ids"].max() + 1)
    alone = _alone(apply, params, [row["inputs"][row["segment_ids"] == s] for s in ids])
    for s, alone_TV in zip(ids, alone):
        np.testing.assert_allclose(logits[0][row["segment_ids"] == s], alone_TV, rtol=1e-5, atol=1e-5,
                                   err_msg=f"{positional}: concat_and_split segment {s}")


def test_without_segments_a_packed_row_leaks_across_examples():
    """Sanity check of the test above: dropping segment_ids does change later segments' logits."""
    params, apply = _tiny_model("rope")
    rows = list(packing.first_fit_pack([_ex(10, 1), _ex(10, 20)], SEQ_LEN))
    row = rows[0]
    logits = _logits(apply, params, row["inputs"][None], row["positions"][None])
    [alone] = _alone(apply, params, [row["inputs"][row["segment_ids"] == 2]])
    assert not np.allclose(logits[0][row["segment_ids"] == 2], alone, atol=1e-4)
