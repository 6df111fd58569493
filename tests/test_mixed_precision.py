"""model.dtype=bfloat16 (parameters float32): a short run tracks the float32 run's loss, and the precision-
sensitive parts (norm statistics, softmaxes, logits, loss) stay float32 while the matmuls run in bfloat16.

Tolerance, from measurement: over 60 AdamW steps (peak rate 3e-3) of a tiny char-level GPT on Tiny Shakespeare,
the loss falls from 4.17 to about 2.86 in both runs; the two trajectories part after the warmup's loss spike
(step 18, one-step gap 0.15), so the test compares 10-step means: their gap measured at most 0.028 and the mean
per-step gap 0.0145 (2-core Xeon with AVX-512/AMX, jax 0.10.2). Allowed: 0.1 for the 10-step means and 0.05
for the mean per-step gap (3.5x margin), far below the 1.0 the 10-step mean loss falls, so a bf16 path that
stopped learning or lost precision where it matters fails.
"""

from __future__ import annotations

from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.model_sizes import apply_model_size
from llm_jax import config as config_lib
from llm_jax.training.run import build_run, model_inputs_fn
from llm_jax.training.state import init_state
from llm_jax.training.steps import apply_model, make_train_chunk, make_train_step
from conftest import shared_data_file

STEPS, SEQ_LEN, BATCH = 60, 32, 8
MEAN_GAP, WINDOW_GAP, WINDOW = 0.05, 0.1, 10


def _config(dtype: str):
    config = config_lib.default_config()
    apply_model_size(config, "tiny")
    config.model.update(max_len=SEQ_LEN, dtype=dtype)
    config.data.update(path=str(shared_data_file("tinyshakespeare.txt")), split_by="file", tokenizer="char",
                       seq_len=SEQ_LEN, pipeline="windows")
    config.train.update(batch_size=BATCH, steps=STEPS)
    config.optimizer.update(learning_rate=3e-3, warmup_steps=10, min_learning_rate=3e-4)
    config.mesh.update(data=1, fsdp=1, tensor=1)
    return config


def _losses(dtype: str, workdir) -> np.ndarray:
    """train/loss of every step of a STEPS-step run from seed 0, through the real (scanned) train step."""
    run = build_run(_config(dtype), str(workdir), devices=jax.devices()[:1])
    step = make_train_step(run.model, run.task, run.tx, run.schedule, 1, use_dropout=False)
    with jax.set_mesh(run.mesh), run.rules_context():
        state = init_state(run.model, run.tx, model_inputs_fn(run.task), 0, run.shardings)
        _, metrics = jax.jit(make_train_chunk(step))(state, run.data.train.next_chunk(STEPS))
    return np.asarray(metrics["train/loss"])


@pytest.fixture(scope="module")
def losses(tmp_path_factory):
    return {dtype: _losses(dtype, tmp_path_factory.mktemp(dtype)) for dtype in ("float32", "bfloat16")}


def test_bfloat16_run_tracks_float32_loss(losses):
    windows = {dtype: values.reshape(-1, WINDOW).mean(1) for dtype, values in losses.items()}
    for dtype, means in windows.items():
        assert means[-1] < means[0] - 0.8, f"the {dtype} run did not learn: 10-step mean losses {means}"
    step_gap = np.abs(losses["bfloat16"] - losses["float32"]).mean()
    window_gap = np.abs(windows["bfloat16"] - windows["float32"])
    assert step_gap < MEAN_GAP and window_gap.max() < WINDOW_GAP, (
        f"bf16 drifted from f32: mean per-step |gap| {step_gap:.4f} (allowed {MEAN_GAP}), 10-step mean gaps "
        f"{np.round(window_gap, 4)} (allowed {WINDOW_GAP}); a change made bf16 compute lose precision where f32 "
        "is needed (norm statistics, softmax, logits, loss)")


def _reductions(jaxpr) -> Counter:
    """(primitive, operand dtype) of every reduction in a jaxpr and its sub-jaxprs."""
    found = Counter()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name.startswith("reduce_") or eqn.primitive.name in ("argmax", "dot_general"):
            found[(eqn.primitive.name, eqn.invars[0].aval.dtype.name)] += 1
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found.update(_reductions(sub))
    return found


def test_norms_softmax_logits_and_loss_are_float32_under_bfloat16(tmp_path):
    run = build_run(_config("bfloat16"), str(tmp_path), devices=jax.devices()[:1])
    batch = {key: value[0] for key, value in run.data.train.next_chunk(1).items()}
    with jax.set_mesh(run.mesh), run.rules_context():
        params = init_state(run.model, run.tx, model_inputs_fn(run.task), 0, run.shardings).params
        assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
        outputs = apply_model(run.model, run.task, params, batch)
        assert outputs.hidden_BTD.dtype == jnp.bfloat16 and outputs.heads["lm"].dtype == jnp.float32

        def loss(p):
            terms = run.task.loss_terms(apply_model(run.model, run.task, p, batch), batch)
            return sum(loss_sum / weight for loss_sum, weight in terms.values())

        assert jax.eval_shape(loss, params).dtype == jnp.float32
        found = _reductions(jax.make_jaxpr(jax.value_and_grad(loss))(params).jaxpr)
    # every mean/variance, softmax max/sum and logsumexp, forward and backward, reduces float32 values
    reduce_dtypes = {dtype for (name, dtype) in found if name.startswith("reduce_")}
    assert reduce_dtypes == {"float32"}, found
    assert found[("dot_general", "bfloat16")] > 0, f"no bfloat16 matmul: {found}"  # the compute dtype is in use
