import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import needs
from llm_jax.training.checkpoint import Checkpointer

needs(jax.device_count() >= 8, "needs 8 (CPU) devices: XLA_FLAGS from conftest")


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def _mesh(shape, names):
    return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def _shardings(mesh: jax.sharding.Mesh, w_spec: P, tree: Any) -> Any:
    """'w' (and its Adam moments) get w_spec; everything else is replicated on mesh."""

    def leaf_sharding(path, _):
        name = path[-1].key if isinstance(path[-1], jax.tree_util.DictKey) else None
        return NamedSharding(mesh, w_spec if name == "w" else P())

    return jax.tree_util.tree_map_with_path(leaf_sharding, tree)


_TX = optax.adamw(1e-3)


def _init(seed: int = 0) -> TrainState:
    k_w, k_b, k_rng = jax.random.split(jax.random.PRNGKey(seed), 3)
    params = {
        "w": jax.random.normal(k_w, (16, 8), jnp.float32),
        "b": jax.random.normal(k_b, (8,), jnp.float32),
    }
    opt_state = _TX.init(params)
    # Take one optimizer step so mu/nu/count are non-trivial.
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    _, opt_state = _TX.update(grads, opt_state, params)
    # rng is the raw uint32[2] key data (jax.random.PRNGKey), as in the trainer.
    return TrainState(step=jnp.asarray(7, jnp.int32), params=params, opt_state=opt_state, rng=k_rng)


def _make_state(mesh: jax.sharding.Mesh, w_spec: P, seed: int = 0) -> TrainState:
    shardings = _shardings(mesh, w_spec, jax.eval_shape(_init, seed))
    return jax.jit(_init, static_argnums=0, out_shardings=shardings)(seed)


def _abstract(mesh: jax.sharding.Mesh, w_spec: P) -> TrainState:
    """ShapeDtypeStructs of the state (jax.eval_shape) carrying the target shardings."""
    shapes = jax.eval_shape(_init, 0)
    shardings = _shardings(mesh, w_spec, shapes)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)


def _assert_trees_equal(a: Any, b: Any) -> None:
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _step_dirs(directory) -> list[int]:
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


def test_round_trip_keep_latest(tmp_path):
    mesh = _mesh((8,), ("fsdp",))
    state = _make_state(mesh, P("fsdp", None))
    assert state.params["w"].sharding == NamedSharding(mesh, P("fsdp", None))
    ckpt_dir = tmp_path / "checkpoints"

    ckpt = Checkpointer(str(ckpt_dir), keep=2)
    try:
        assert ckpt.latest_step() is None
        for step in (10, 20, 30):
            assert ckpt.save(step, state, {"step": step * 40, "seed": 0}) is True
        ckpt.wait()
        assert ckpt.latest_step() == 30
        assert _step_dirs(ckpt_dir) == [20, 30]

        restored, data = ckpt.restore(None, _abstract(mesh, P("fsdp", None)))
    finally:
        ckpt.close()

    assert isinstance(restored, TrainState)
    assert restored.rng.dtype == jnp.uint32 and restored.rng.shape == (2,)
    _assert_trees_equal(restored, state)
    assert data == {"step": 1200, "seed": 0}
    assert restored.params["w"].sharding == NamedSharding(mesh, P("fsdp", None))
    assert restored.params["b"].sharding == NamedSharding(mesh, P())


def test_restore_specific_step_and_missing_step(tmp_path):
    mesh = _mesh((8,), ("fsdp",))
    state = _make_state(mesh, P("fsdp", None))
    state2 = state.replace(step=state.step + 1)
    with Checkpointer(str(tmp_path / "checkpoints"), keep=3, async_save=False) as ckpt:
        ckpt.save(1, state, {"step": 1})
        ckpt.save(2, state2, {"step": 2})
        restored, data = ckpt.restore(1, _abstract(mesh, P("fsdp", None)))
        assert int(restored.step) == 7 and data == {"step": 1}
        with pytest.raises(FileNotFoundError, match="step 5"):
            ckpt.restore(5, _abstract(mesh, P("fsdp", None)))


def test_restore_onto_different_mesh(tmp_path):
    save_mesh = _mesh((8,), ("fsdp",))
    state = _make_state(save_mesh, P("fsdp", None))
    with Checkpointer(str(tmp_path / "checkpoints"), keep=1) as ckpt:
        ckpt.save(5, state, {"step": 5, "seed": 3})

    new_mesh = _mesh((2, 4), ("data", "tensor"))
    abstract = _abstract(new_mesh, P(None, "tensor"))
    with Checkpointer(str(tmp_path / "checkpoints"), keep=1) as ckpt:
        restored, data = ckpt.restore(None, abstract)

    _assert_trees_equal(restored, state)
    assert data == {"step": 5, "seed": 3}
    want = NamedSharding(new_mesh, P(None, "tensor"))
    assert restored.params["w"].sharding == want
    for got, req in zip(jax.tree.leaves(restored), jax.tree.leaves(abstract)):
        assert got.sharding == req.sharding
    # The Adam moments of 'w' follow the requested sharding too.
    mu_w = restored.opt_state[0].mu["w"]
    assert mu_w.sharding == want
    assert mu_w.addressable_shards[0].data.shape == (16, 2)


def test_async_save_visible_to_fresh_checkpointer(tmp_path):
    mesh = _mesh((8,), ("fsdp",))
    state = _make_state(mesh, P("fsdp", None))
    directory = str(tmp_path / "checkpoints")

    ckpt = Checkpointer(directory, keep=2, async_save=True)
    assert ckpt.save(100, state, {"step": 100, "seed": 0}) is True
    ckpt.wait()
    # Simulate a resumed process: a brand-new Checkpointer on the same directory.
    fresh = Checkpointer(directory, keep=2)
    try:
        assert fresh.latest_step() == 100
        restored, data = fresh.restore(None, _abstract(mesh, P("fsdp", None)))
        _assert_trees_equal(restored, state)
        assert data == {"step": 100, "seed": 0}
    finally:
        fresh.close()
        ckpt.close()


def test_restore_right_after_async_save_waits_for_commit(tmp_path):
    mesh = _mesh((8,), ("fsdp",))
    state = _make_state(mesh, P("fsdp", None))
    with Checkpointer(str(tmp_path / "checkpoints"), keep=2, async_save=True) as ckpt:
        ckpt.save(3, state, {"step": 3})
        # No explicit wait(): restore must not read a half-written step.
        restored, data = ckpt.restore(None, _abstract(mesh, P("fsdp", None)))
    _assert_trees_equal(restored, state)
    assert data == {"step": 3}


def test_relative_directory_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = Checkpointer("rel/checkpoints", keep=1, async_save=False)
    try:
        assert os.path.isabs(ckpt.directory)
        assert ckpt.directory == str(tmp_path / "rel" / "checkpoints")
        mesh = _mesh((8,), ("fsdp",))
        ckpt.save(1, _make_state(mesh, P("fsdp", None)), {"step": 1})
        assert (tmp_path / "rel" / "checkpoints" / "1").is_dir()
    finally:
        ckpt.close()


def test_missing_checkpoint_raises(tmp_path):
    directory = tmp_path / "empty" / "checkpoints"
    mesh = _mesh((8,), ("fsdp",))
    with Checkpointer(str(directory), keep=1) as ckpt:
        assert ckpt.latest_step() is None
        with pytest.raises(FileNotFoundError) as excinfo:
            ckpt.restore(None, _abstract(mesh, P("fsdp", None)))
    assert str(directory) in str(excinfo.value)


def _as_if_saved_by_two_processes(data_dir) -> None:
    """Replaces the one process's iterator state of a step by two processes' different ones (a 2-process run)."""
    (data_dir / "process_0-of-1.json").unlink()
    (data_dir / "process_0-of-2.json").write_text('{"position": 3}')
    (data_dir / "process_1-of-2.json").write_text('{"position": 5}')


def test_params_restore_reads_a_multi_process_checkpoint_without_its_data_states(tmp_path):
    directory = tmp_path / "checkpoints"
    state = _make_state(_mesh((8,), ("fsdp",)), P("fsdp", None))
    with Checkpointer(str(directory), keep=2, async_save=False) as ckpt:
        ckpt.save(4, state, {"position": 0})
    _as_if_saved_by_two_processes(directory / "4" / "data")
    new_mesh = _mesh((2, 4), ("data", "tensor"))
    abstract = _abstract(new_mesh, P(None, "tensor"))
    with Checkpointer(str(directory), keep=2, read_only=True) as ckpt:
        with pytest.raises(ValueError, match="holds the data-iterator states of 2 processes"):
            ckpt.restore(None, abstract)  # training resume still insists on the saved process count
        step, params = ckpt.restore_params(None, abstract.params)
    assert step == 7  # the train state's step, as restore gives it
    _assert_trees_equal(params, state.params)
    assert params["w"].sharding == NamedSharding(new_mesh, P(None, "tensor"))
    assert params["b"].sharding == NamedSharding(new_mesh, P())


def test_read_only_checkpointer_creates_no_directory_and_refuses_to_save(tmp_path):
    directory = tmp_path / "run" / "checkpoints"
    mesh = _mesh((8,), ("fsdp",))
    with Checkpointer(str(directory), keep=1, read_only=True) as ckpt:
        assert ckpt.latest_step() is None
        with pytest.raises(FileNotFoundError, match="No checkpoint found"):
            ckpt.restore_params(None, _abstract(mesh, P("fsdp", None)).params)
        with pytest.raises(ValueError, match="read-only"):
            ckpt.save(1, _make_state(mesh, P("fsdp", None)), {})
    assert not (tmp_path / "run").exists()
