"""The host training loop: dispatch chunks of steps, log, evaluate, checkpoint, resume.

The device never waits for the host: each chunk's metrics are fetched after the next chunk has been
dispatched, except at log / eval / checkpoint steps, where the loop synchronises on purpose.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from typing import Any, Callable

import jax
import ml_collections
from jax.experimental import multihost_utils
import numpy as np
from absl import logging

from llm_jax.data.pipeline import describe
from llm_jax.errors import TrainingDivergedError
from llm_jax.sharding import batch_shardings, global_batch
from llm_jax.training import evaluation
from llm_jax.training.checkpoint import Checkpointer
from llm_jax.training.flops import peak_flops_per_device, train_flops_per_token
from llm_jax.training.init_from import init_params_from
from llm_jax.training.metrics import MetricsWriter, ProgressLine, log_progress, read_metrics
from llm_jax.training.run import Run, build_run, jit_train_chunk, model_inputs_fn, write_run_config
from llm_jax.training.state import TrainState, init_state


@dataclasses.dataclass(frozen=True)
class StepEvents:
    """Which steps log, evaluate and checkpoint, and where each dispatched chunk of steps ends.

    Chunks end at multiples of steps_per_dispatch and at event steps, all absolute step numbers, so a
    resumed run dispatches exactly the chunks an uninterrupted run would.
    """

    total: int
    per_dispatch: int
    log_every: int
    eval_every: int
    checkpoint_every: int

    @classmethod
    def from_config(cls, train: ml_collections.ConfigDict) -> "StepEvents":
        return cls(train.steps, train.steps_per_dispatch, train.log_every, train.eval_every, train.checkpoint_every)

    @staticmethod
    def _due(step: int, every: int) -> bool:
        return every > 0 and step % every == 0

    def is_log(self, step: int) -> bool:
        return self._due(step, self.log_every) or step == self.total

    def is_eval(self, step: int) -> bool:
        return self._due(step, self.eval_every) or step == self.total

    def is_checkpoint(self, step: int) -> bool:
        return self._due(step, self.checkpoint_every) or step == self.total

    def next_stop(self, step: int) -> int:
        candidates = [self.total, (step // self.per_dispatch + 1) * self.per_dispatch]
        for every in (self.log_every, self.eval_every, self.checkpoint_every):
            if every > 0:
                candidates.append((step // every + 1) * every)
        return min(candidates)


class ChunkRunner:
    """Ahead-of-time compiled train chunks, one executable per chunk length; compile time is reported."""

    def __init__(self, run: Run):
        self._jitted = jit_train_chunk(run)
        self._compiled: dict[int, Any] = {}
        self.compile_seconds = 0.0

    def __call__(self, state: TrainState, batches: dict[str, jax.Array]) -> tuple[TrainState, dict]:
        length = next(iter(batches.values())).shape[0]
        if length not in self._compiled:
            start = time.perf_counter()
            self._compiled[length] = self._jitted.lower(state, batches).compile()
            self.compile_seconds += time.perf_counter() - start
        return self._compiled[length](state, batches)


class StopRequest:
    """Turns SIGTERM/SIGINT into a request to checkpoint at the next chunk boundary and exit."""

    def __init__(self):
        self.signal_number: int | None = None
        self._previous = {}
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal_number = signum

    def agreed(self) -> int | None:
        """The signal if any process received one: all processes must stop at the same chunk boundary,
        or their collectives would no longer match (one small all-gather per chunk, multi-process only)."""
        if jax.process_count() == 1:
            return self.signal_number
        signals = multihost_utils.process_allgather(np.array(self.signal_number or 0, np.int32))
        return int(np.max(signals)) or None

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class TrainWindow:
    """Train metrics and wall time since the last log step; eval, checkpoint and compile time excluded."""

    def __init__(self, step: int):
        self.reset(step)

    def reset(self, step: int) -> None:
        self.start_step, self.start_time, self.excluded = step, time.perf_counter(), 0.0
        self.chunks: list[dict[str, np.ndarray]] = []

    def add(self, first_step: int, metrics: dict[str, np.ndarray]) -> None:
        losses = metrics["train/loss"]
        bad = np.flatnonzero(~np.isfinite(losses))
        if bad.size:
            step = first_step + int(bad[0]) + 1
            raise TrainingDivergedError(f"train/loss is {losses[bad[0]]} at step {step}; the last checkpoint "
                                        "before it is intact. Lower optimizer.learning_rate or raise warmup_steps.")
        self.chunks.append(metrics)

    def summary(self, train_seconds: float) -> dict[str, float]:
        merged = {key: np.concatenate([chunk[key] for chunk in self.chunks]) for key in self.chunks[0]}
        tokens = float(merged.pop("train/tokens").sum())
        summary = {key: float(values.mean()) for key, values in merged.items()}
        summary["train/learning_rate"] = float(merged["train/learning_rate"][-1])
        summary["train/tokens_per_second"] = tokens / max(train_seconds, 1e-9)
        return summary


class HostLoop:
    """Runs chunks from `start` to train.steps with logging, evaluation and checkpoints."""

    def __init__(self, run: Run, writer: MetricsWriter, checkpointer: Checkpointer):
        self.run, self.writer, self.checkpointer = run, writer, checkpointer
        self.events = StepEvents.from_config(run.config.train)
        self.chunks = ChunkRunner(run)
        self.evaluator = evaluation.Evaluator(run)
        self.progress = ProgressLine(self.events.total)
        self.sharding = batch_shardings(run.mesh, run.rules, run.task.batch_spec(), stacked=True)
        peak = peak_flops_per_device(run.config.train.peak_flops_per_device)
        flops = train_flops_per_token(run.model_config, run.config.data.seq_len)
        self.mfu_scale = flops / (peak * jax.device_count()) if peak else None
        self.final_metrics: dict[str, float] = {}
        self.train_seconds = 0.0

    def _excluded(self, window: TrainWindow, action: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        result = action()
        window.excluded += time.perf_counter() - start
        return result

    def _log(self, step: int, window: TrainWindow) -> None:
        train_seconds = time.perf_counter() - window.start_time - window.excluded
        metrics = window.summary(train_seconds)
        if self.mfu_scale:
            metrics["train/mfu"] = metrics["train/tokens_per_second"] * self.mfu_scale
        self.writer.write(step, metrics)
        self.final_metrics.update(metrics)
        self.train_seconds += train_seconds
        log_progress(self.progress.format(step, metrics, train_seconds=self.train_seconds))
        window.reset(step)

    def _events(self, step: int, state: TrainState, window: TrainWindow, force_checkpoint: bool) -> None:
        if self.events.is_log(step):
            self._log(step, window)
        if self.events.is_eval(step):
            metrics = self._excluded(window, lambda: self.evaluator.evaluate(
                state.params, self.run.config.data.eval_split, self.run.config.train.eval_steps))
            self.writer.write(step, metrics)
            self.final_metrics.update(metrics)
            logging.info("step %d | %s", step, " | ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if self.events.is_checkpoint(step) or force_checkpoint:
            data_state = self.run.data.train.get_state()
            self._excluded(window, lambda: self.checkpointer.save(step, state, data_state, force=True))

    def run_from(self, state: TrainState, start: int, stop_request: StopRequest) -> TrainState:
        step, pending, window = start, None, TrainWindow(start)
        while step < self.events.total:
            stop = self.events.next_stop(step)
            local = self.run.data.train.next_chunk(stop - step)
            batches = global_batch(local, self.sharding, 1, self.run.config.train.batch_size)
            compile_before = self.chunks.compile_seconds
            state, metrics = self.chunks(state, batches)
            window.excluded += self.chunks.compile_seconds - compile_before
            if pending is not None:
                window.add(*pending)
            pending, step = (step, metrics), stop
            signal_number = stop_request.agreed()
            interrupted = signal_number is not None
            if any((self.events.is_log(step), self.events.is_eval(step), self.events.is_checkpoint(step),
                    interrupted)):
                window.add(*jax.device_get(pending))
                pending = None
                self._events(step, state, window, force_checkpoint=interrupted)
            if interrupted:
                logging.warning("signal %d: checkpointed step %d, stopping", signal_number, step)
                raise SystemExit(128 + signal_number)
        return state


def _init_from(run: Run, state: TrainState) -> TrainState:
    """The fresh state with train.init_from's weights where they fit (new heads keep their init) and the
    optimizer state initialised for them."""
    source = run.config.train.init_from
    params, report = init_params_from(source, jax.device_get(state.params), run.model_config)
    params = jax.device_put(params, run.shardings.params)
    opt_state = jax.jit(run.tx.init, out_shardings=run.shardings.opt_state)(params)
    logging.info("initialised %d parameter arrays from %s; new: %s; not used: %s", len(report["loaded"]), source,
                 ", ".join(report["new"]) or "none", ", ".join(report["dropped"]) or "none")
    return state.replace(params=params, opt_state=opt_state)


def _restore_or_init(run: Run, checkpointer: Checkpointer) -> tuple[TrainState, int]:
    latest = checkpointer.latest_step()
    if latest is None:
        state = init_state(run.model, run.tx, model_inputs_fn(run.task), run.config.train.seed, run.shardings)
        return (_init_from(run, state) if run.config.train.init_from else state), 0
    state, data_state = checkpointer.restore(latest, run.abstract_state)
    run.data.train.set_state(data_state)
    logging.info("resumed from %s at step %d", run.checkpoint_dir, latest)
    return state, latest


def _drop_metrics_after(workdir: str, step: int) -> None:
    """A resumed run rewrites the steps after its checkpoint; drop the interrupted run's lines for them."""
    path = os.path.join(workdir, "metrics.jsonl")
    if jax.process_index() != 0 or not os.path.exists(path):
        return
    kept = [record for record in read_metrics(path) if record["step"] <= step]
    with open(path, "w") as f:
        f.writelines(json.dumps(record) + "\n" for record in kept)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains (or resumes) the run in `workdir`; returns the last logged train and eval metrics."""
    run = build_run(config, workdir)
    write_run_config(run)
    num_params = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(run.abstract_state.params))
    logging.info("model: %s parameters | mesh %s | %d devices (%s)", f"{num_params:,}", dict(run.mesh.shape),
                 jax.device_count(), jax.devices()[0].device_kind)
    checkpointer = Checkpointer(run.checkpoint_dir, keep=config.train.keep_checkpoints)
    stop_request = StopRequest()
    try:
        with jax.set_mesh(run.mesh), run.rules_context():
            state, start = _restore_or_init(run, checkpointer)
            _drop_metrics_after(workdir, start)
            writer = MetricsWriter(workdir)
            if start == 0:
                writer.write(0, describe(run.data))
            try:
                loop = HostLoop(run, writer, checkpointer)
                if start >= config.train.steps:
                    logging.info("%s already holds step %d of %d: nothing to train", workdir, start, config.train.steps)
                    return _last_metrics(workdir)
                loop.run_from(state, start, stop_request)
                logging.info("compile time %.1fs (excluded from tokens/s)", loop.chunks.compile_seconds)
                return loop.final_metrics
            finally:
                writer.close()
    finally:
        stop_request.restore()
        checkpointer.close()
        run.data.train.close()


def _last_metrics(workdir: str) -> dict[str, float]:
    latest: dict[str, float] = {}
    path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(path):
        for record in read_metrics(path):
            latest.update({k: v for k, v in record.items() if k != "step"})
    return latest
