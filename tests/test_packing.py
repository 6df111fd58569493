"""The Grain packers training uses (`data.packing`): concat_split against an independent numpy reference,
first_fit keeping every token once in well-formed segments, and the model-level property that a packed row
gives each document exactly the logits it gets alone."""

from __future__ import annotations

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.model_sizes import apply_model_size
from llm_jax import config as config_lib
from llm_jax.data.objectives import NextTokenRows
from llm_jax.data.packing import PACKINGS
from llm_jax.decoding.sampling import lm_logits
from llm_jax.models.families import build_model
from llm_jax.models.model_config import build_model_config
from reference_packing import concat_split_rows

VOCAB = 50
ONE_DEVICE = {"data": 1, "fsdp": 1, "tensor": 1}
EOS = 0


def _docs(seed: int, count: int, max_len: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, VOCAB, size=int(rng.integers(1, max_len + 1))).astype(np.int32) for _ in range(count)]


def _pack(packing: str, docs: list[np.ndarray], length: int, **data_overrides) -> list[dict[str, np.ndarray]]:
    """The rows the training pipeline's packer makes of `docs` (each {"tokens"}, in this order)."""
    data = config_lib.default_config().data
    data.update(**data_overrides)
    documents = grain.MapDataset.source([{"tokens": doc} for doc in docs]).to_iter_dataset()
    return list(PACKINGS.get(packing)(documents, length, data))


# ----------------------------------------------------------------------------- concat_split


@pytest.mark.parametrize("length", [5, 17, 64])
def test_concat_split_rows_equal_the_numpy_reference(length):
    docs = _docs(0, 30, 40)
    rows, expected = _pack("concat_split", docs, length), concat_split_rows(docs, length)
    assert len(rows) == len(expected) == -(-sum(map(len, docs)) // length)
    for index, (row, want) in enumerate(zip(rows, expected)):
        for key in want:
            np.testing.assert_array_equal(row[key], want[key], err_msg=f"row {index}, {key}")


# ----------------------------------------------------------------------------- first_fit


def _check_packed(rows: list[dict[str, np.ndarray]], pieces: list[np.ndarray], length: int) -> None:
    """Every piece exactly once, inside one segment, in order; padding a zero suffix; positions restart."""
    found = []
    for row in rows:
        tokens, seg, pos = row["tokens"], row["tokens_segment_ids"], row["tokens_positions"]
        assert tokens.shape == seg.shape == pos.shape == (length,)
        assert tokens.dtype == seg.dtype == pos.dtype == np.int32
        pad = seg == 0
        if pad.any():
            assert pad[np.argmax(pad):].all(), "padding is a suffix"
        np.testing.assert_array_equal(tokens[pad], 0)
        np.testing.assert_array_equal(pos[pad], 0)
        ids = seg[~pad]
        assert list(np.unique(ids)) == list(range(1, ids.max() + 1)) and (np.diff(ids) >= 0).all()
        for s in range(1, ids.max() + 1):
            np.testing.assert_array_equal(pos[seg == s], np.arange(np.sum(seg == s)))
            found.append(tuple(tokens[seg == s].tolist()))
    assert sorted(found) == sorted(tuple(piece.tolist()) for piece in pieces)


@pytest.mark.parametrize("bins", [1, 3, 16])
def test_first_fit_keeps_every_token_once_and_cuts_long_documents(bins):
    length = 16
    docs = _docs(2, 60, 40)  # lengths 1..40: some longer than a row
    rows = _pack("first_fit", docs, length, packing_bins=bins)
    pieces = [doc[start:start + length] for doc in docs for start in range(0, len(doc), length)]
    _check_packed(rows, pieces, length)
    assert len(rows) >= -(-sum(map(len, docs)) // length)
    if bins > 1:
        assert max(row["tokens_segment_ids"].max() for row in rows) >= 3, "rows really hold several documents"
    again = _pack("first_fit", docs, length, packing_bins=bins)
    assert all(np.array_equal(x[key], y[key]) for x, y in zip(rows, again) for key in x) and len(again) == len(rows)


# ----------------------------------------------------------------------------- model-level property


BATCH = 16  # every model call below runs on [BATCH, SEQ_LEN]: one compile per positional scheme and signature
SEQ_LEN = 32
_MODELS: dict = {}


def _tiny_model(positional: str):
    """(params, jitted logits function) of a tiny decoder, built and initialised once per positional scheme."""
    if positional not in _MODELS:
        config = config_lib.default_config()
        apply_model_size(config, "test")
        config.model.update(max_len=SEQ_LEN, positional=positional)
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

    docs = [np.append(doc, EOS) for doc in _docs(4, 10, 14)]
    rows = [NextTokenRows(True)(row) for row in _pack("first_fit", docs, SEQ_LEN + 1, packing_bins=2)]
    packed = {key: np.stack([row[key] for row in rows]) for key in rows[0]}
    logits = _logits(apply, params, packed["inputs"], packed["positions"], packed["segment_ids"])
    assert logits.shape[:2] == (len(rows), SEQ_LEN)
    assert max(r["segment_ids"].max() for r in rows) >= 2  # rows really hold several examples

    segments = [(b, s) for b, row in enumerate(rows) for s in range(1, row["segment_ids"].max() + 1)]
    alone = _alone(apply, params, [rows[b]["inputs"][rows[b]["segment_ids"] == s] for b, s in segments])
    for (b, s), alone_TV in zip(segments, alone):
        np.testing.assert_allclose(logits[b][rows[b]["segment_ids"] == s], alone_TV, rtol=1e-5, atol=1e-5,
                                   err_msg=f"{positional}: row {b}, segment {s}")
    assert len(segments) == len(docs)

    # concat_split rows satisfy the same property (documents split across rows too).
    docs = [np.append(doc, EOS) for doc in _docs(5, 6, 20)]
    row = NextTokenRows(True)(_pack("concat_split", docs, SEQ_LEN + 1)[0])
    assert row["segment_ids"].max() >= 2
    logits = _logits(apply, params, row["inputs"][None], row["positions"][None], row["segment_ids"][None])
    ids = range(1, row["segment_ids"].max() + 1)
    alone = _alone(apply, params, [row["inputs"][row["segment_ids"] == s] for s in ids])
    for s, alone_TV in zip(ids, alone):
        np.testing.assert_allclose(logits[0][row["segment_ids"] == s], alone_TV, rtol=1e-5, atol=1e-5,
                                   err_msg=f"{positional}: concat_split segment {s}")


def test_without_segments_a_packed_row_leaks_across_examples():
    """Sanity check of the test above: dropping segment_ids does change later segments' logits."""
    params, apply = _tiny_model("rope")
    row = NextTokenRows(True)(_pack("first_fit", [np.arange(1, 12), np.arange(20, 31)], SEQ_LEN + 1)[0])
    logits = _logits(apply, params, row["inputs"][None], row["positions"][None])
    [alone] = _alone(apply, params, [row["inputs"][row["segment_ids"] == 2]])
    assert not np.allclose(logits[0][row["segment_ids"] == 2], alone, atol=1e-4)
