"""The host training loop: dispatch chunks of steps, log, evaluate, checkpoint, resume.

The device never waits for the host: each chunk's metrics are fetched after the next chunk has been
dispatched, except at log / eval / checkpoint steps, where the loop synchronises on purpose.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from typing import Any, Callable, Sequence

import jax
import ml_collections
from jax.experimental import multihost_utils
import numpy as np
from absl import logging

from llm_jax.data.pipeline import describe
from llm_jax.errors import TrainingDivergedError, WorkdirError
from llm_jax.provenance import provenance
from llm_jax.sharding import batch_shardings, global_batch
from llm_jax.training import evaluation, run_record
from llm_jax.training.checkpoint import CHECKPOINTS_DIR, Checkpointer, committed_steps
from llm_jax.training.flops import mfu_scale, train_flops_per_token
from llm_jax.training.init_from import init_params_from
from llm_jax.training.metrics import MetricsWriter, ProgressLine, keep_metrics_through, log_progress, read_run_metrics
from llm_jax.training.peak_flops import Peak, resolve_peak
from llm_jax.training.profiling import ProfileWindow, StepProfiler
from llm_jax.training.run import Run, build_run, jit_train_chunk, model_inputs_fn
from llm_jax.training.state import TrainState, init_state
from llm_jax.training.steps import all_finite
from llm_jax.workdir_lock import metrics_lock


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
    """Turns SIGTERM/SIGINT and preemption notices into a stop at the next chunk boundary, agreed by all processes.

    One process: SIGTERM and SIGINT set a flag here. Several processes: `jax.distributed.initialize` installs JAX's
    preemption notifier as the SIGTERM handler and it stays installed (replacing it would hide the notices JAX
    propagates between hosts, e.g. a TPU maintenance event); the loop asks `reached_preemption_sync_point` at
    every chunk boundary, which is true on every process at the same boundary once any process was notified.
    SIGINT is still handled here and agreed by a small all-gather per chunk. Either way the run checkpoints that
    boundary and exits with 128 + the signal number.
    """

    def __init__(self):
        self.signal_number: int | None = None
        self._boundaries = 0
        self._previous = {}
        self._jax_preemption = jax.process_count() > 1 and bool(jax.config.jax_enable_preemption_service)
        handled = (signal.SIGINT,) if self._jax_preemption else (signal.SIGTERM, signal.SIGINT)
        for signum in handled:
            self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal_number = signum

    def agreed(self) -> int | None:
        """The signal if any process received one or JAX reached a preemption sync point; called by every
        process at every chunk boundary (all processes dispatch the same chunks, so the counts agree)."""
        if jax.process_count() == 1:
            return self.signal_number
        self._boundaries += 1
        if self._jax_preemption and multihost_utils.reached_preemption_sync_point(self._boundaries):
            return int(signal.SIGTERM)
        signals = multihost_utils.process_allgather(np.array(self.signal_number or 0, np.int32))
        return int(np.max(signals)) or None

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class NonfiniteGuard:
    """The host side of train.nonfinite, fed each chunk's per-step metrics (a chunk late, so no per-step sync).

    stop: the first step whose loss or gradient norm is NaN/Inf ends the run, naming it. skip: the device kept the
    previous state for those steps (train/skipped); more than train.max_consecutive_skips in a row end the run.
    Both: a finite loss above train.loss_spike_factor times the running average is logged as a spike.
    """

    def __init__(self, train: ml_collections.ConfigDict):
        self.policy, self.max_skips, self.spike_factor = train.nonfinite, train.max_consecutive_skips, \
            train.loss_spike_factor
        self.consecutive_skips = 0
        self.average: float | None = None

    def check(self, first_step: int, metrics: dict[str, np.ndarray]) -> None:
        losses, norms = metrics["train/loss"], metrics["train/grad_norm"]
        skipped = metrics.get("train/skipped", np.zeros_like(losses))
        for offset, (loss, norm, skip) in enumerate(zip(losses, norms, skipped)):
            step = first_step + offset + 1
            if self.policy == "stop" and not (np.isfinite(loss) and np.isfinite(norm)):
                raise TrainingDivergedError(
                    f"train/loss is {loss} and train/grad_norm {norm} at step {step}; no later state was "
                    "checkpointed, the newest checkpoint holds the last good one. Lower optimizer.learning_rate, "
                    "raise optimizer.warmup_steps or set train.nonfinite=skip")
            self.consecutive_skips = self.consecutive_skips + 1 if skip else 0
            if self.consecutive_skips > self.max_skips:
                raise TrainingDivergedError(
                    f"{self.consecutive_skips} updates in a row were skipped (non-finite loss, gradient or "
                    f"parameters) up to step {step}, more than train.max_consecutive_skips={self.max_skips}; "
                    "lower optimizer.learning_rate or raise optimizer.warmup_steps")
            if not skip:
                self._watch_spike(step, float(loss))

    def _watch_spike(self, step: int, loss: float) -> None:
        if self.spike_factor and self.average is not None and loss > self.spike_factor * self.average:
            logging.warning("loss spike at step %d: train/loss %.4f is %.1fx the running average %.4f", step, loss,
                            loss / self.average, self.average)
        self.average = loss if self.average is None else 0.9 * self.average + 0.1 * loss


class TrainWindow:
    """Train metrics and wall time since the last log step; eval, checkpoint and compile time excluded."""

    def __init__(self, step: int, guard: NonfiniteGuard):
        self.guard = guard
        self.reset(step)

    def reset(self, step: int) -> None:
        self.start_step, self.start_time, self.excluded = step, time.perf_counter(), 0.0
        self.chunks: list[dict[str, np.ndarray]] = []

    def add(self, first_step: int, metrics: dict[str, np.ndarray]) -> None:
        self.guard.check(first_step, metrics)
        self.chunks.append(metrics)

    def summary(self, train_seconds: float) -> dict[str, float]:
        """Means over the window's applied updates; with train.nonfinite=skip also train/skipped_updates."""
        merged = {key: np.concatenate([chunk[key] for chunk in self.chunks]) for key in self.chunks[0]}
        tokens = float(merged.pop("train/tokens").sum())
        skipped = merged.pop("train/skipped", None)
        applied = np.ones_like(merged["train/loss"], bool) if skipped is None else skipped == 0
        summary = {key: float(values[applied].mean()) if applied.any() else math.nan for key, values in merged.items()}
        summary["train/learning_rate"] = float(merged["train/learning_rate"][-1])
        summary["train/tokens_per_second"] = tokens / max(train_seconds, 1e-9)
        if skipped is not None:
            summary["train/skipped_updates"] = float(skipped.sum())
        return summary


class HostLoop:
    """Runs chunks from `start` to train.steps with logging, evaluation and checkpoints (and a profile trace
    of the updates `profiler` asks for)."""

    def __init__(self, run: Run, writer: MetricsWriter, checkpointer: Checkpointer, peak: Peak,
                 profiler: StepProfiler | None = None):
        self.run, self.writer, self.checkpointer, self.profiler = run, writer, checkpointer, profiler
        self.events = StepEvents.from_config(run.config.train)
        self.chunks = ChunkRunner(run)
        self.evaluator = evaluation.Evaluator(run)
        self.progress = ProgressLine(self.events.total)
        self.sharding = batch_shardings(run.mesh, run.rules, run.task.batch_spec(), stacked=True)
        flops = train_flops_per_token(run.model_config, run.config.data.seq_len, _vocab_head_positions(run))
        self.mfu_scale = mfu_scale(flops, peak.flops_per_device, jax.device_count())
        self.final_metrics: dict[str, float] = {}
        self.train_seconds = 0.0
        self.guard = NonfiniteGuard(run.config.train)
        self._finite = jax.jit(all_finite)
        self._last_batch = jax.jit(lambda stacked: jax.tree.map(lambda x: x[-1], stacked),
                                   out_shardings=self.evaluator.shardings)
        self.last_batches: dict[str, jax.Array] | None = None

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
            self._excluded(window, lambda: self._checkpoint(step, state))

    def _unsaveable(self, state: TrainState) -> str | None:
        """Why `state` is not known to be good, or None: its parameters must be finite and so must the loss they
        give on the last batch trained (the eval step, compiled for evaluation anyway, computes it)."""
        if not bool(self._finite(state.params)):
            return "its parameters hold NaN or Inf"
        sums = jax.device_get(self.evaluator.step(state.params, self._last_batch(self.last_batches)))
        if not all(np.isfinite(value).all() for value in sums.values()):
            return "the loss of its parameters on the last batch trained is NaN or Inf"
        return None

    def _checkpoint(self, step: int, state: TrainState) -> None:
        """Saves the state after `step` only when it is known to be good (train.nonfinite says what else)."""
        problem = self._unsaveable(state)
        if problem is None:
            self.checkpointer.save(step, state, self.run.data.train.get_state(), force=True)
            return
        if self.run.config.train.nonfinite == "stop":
            raise TrainingDivergedError(
                f"the state after step {step} was not checkpointed: {problem}; the newest checkpoint holds the last "
                "good one. Lower optimizer.learning_rate, raise optimizer.warmup_steps or set train.nonfinite=skip")
        logging.warning("step %d not checkpointed: %s (train.nonfinite=skip)", step, problem)

    def run_from(self, state: TrainState, start: int, stop_request: StopRequest) -> TrainState:
        window = TrainWindow(start, self.guard)
        log_every = self.run.config.train.log_every
        if start % log_every and start < self.events.total:
            first_log = min(self.events.total, (start // log_every + 1) * log_every)
            logging.info("resumed between log steps: the train metrics logged at step %d average steps %d-%d only "
                         "(an uninterrupted run averages the %d steps up to it)", first_log, start + 1, first_log,
                         log_every)
        profiler = self.profiler if self.profiler and not self.profiler.skipped(start) else None
        try:
            state = self._run_chunks(state, start, stop_request, window, profiler)
        except BaseException:
            if profiler:
                profiler.finish(state, wait=False)
            raise
        if profiler:
            profiler.finish(state)
        return state

    def _run_chunks(self, state: TrainState, step: int, stop_request: StopRequest, window: TrainWindow,
                    profiler: StepProfiler | None) -> TrainState:
        pending = None
        while step < self.events.total:
            stop = self.events.next_stop(step)
            if profiler:
                window.excluded += profiler.before_dispatch(step, stop)
            local = self.run.data.train.next_chunk(stop - step)
            batches = global_batch(local, self.sharding, 1, self.run.config.train.batch_size)
            compile_before = self.chunks.compile_seconds
            state, metrics = self.chunks(state, batches)
            self.last_batches = batches
            window.excluded += self.chunks.compile_seconds - compile_before
            if profiler:
                window.excluded += profiler.after_dispatch(stop, state)
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


def _vocab_head_positions(run: Run) -> int | None:
    """Positions per row the vocabulary heads read when the task predicts only some (BERT's masked-LM slots,
    the model's `prediction_positions_BP` input; an encoder-decoder's decoder positions), else None: every
    position."""
    inputs = model_inputs_fn(run.task)()
    positions = inputs.get("prediction_positions_BP", inputs.get("decoder_tokens_BT"))
    return None if positions is None else int(positions.shape[-1])


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


def _restore_or_init(run: Run, checkpointer: Checkpointer, restore_fallback: bool) -> tuple[TrainState, int]:
    if checkpointer.latest_step() is None:
        state = init_state(run.model, run.tx, model_inputs_fn(run.task), run.config.train.seed, run.shardings)
        return (_init_from(run, state) if run.config.train.init_from else state), 0
    step, state, data_state = checkpointer.restore_newest(run.abstract_state, fallback=restore_fallback)
    run.data.train.set_state(data_state)
    logging.info("resumed from %s at step %d", run.checkpoint_dir, step)
    return state, step


def _resume_plan(config: ml_collections.ConfigDict, workdir: str, allow_config_change: bool
                 ) -> tuple[dict | None, run_record.Changes | None]:
    """(the run record, this start's config changes) when DIR holds checkpoints to resume, else (record, None);
    refuses changes that alter what is trained before anything is built."""
    record = run_record.read_record(workdir)
    if not committed_steps(os.path.join(workdir, CHECKPOINTS_DIR)):
        return record, None
    if record is None:
        if not allow_config_change:
            raise WorkdirError(f"{workdir} has checkpoints but no {run_record.CONFIG_FILE}, so this start's settings "
                               "cannot be checked against the run's; pass --allow_config_change to resume anyway")
        return None, {}
    changes = run_record.check_resume(record, config, workdir, allow_config_change)
    for note in run_record.schedule_notes(changes, config):
        logging.warning("%s", note)
    if changes:
        logging.info("resuming with changed settings: %s", ", ".join(f"{k} {v[0]!r} -> {v[1]!r}" for k, v in changes.items()))
    return record, changes


def _record_start(run: Run, record: dict | None, start: int, changes: run_record.Changes | None, peak: Peak) -> None:
    """DIR/config.json and DIR/metrics.jsonl agree with the state just restored (or initialised); the
    provenance holds the peak train/mfu divides by and where it came from."""
    if jax.process_index() != 0:
        return
    where = provenance(dict(run.mesh.shape), peak_flops=peak.to_json())
    if start == 0 or record is None:
        run_record.write_first_start(run.workdir, run.config, run.model_config, where)
    else:
        run_record.append_start(run.workdir, record, start, changes or {}, run.model_config, where)
    with metrics_lock(run.workdir):  # evaluate appends under the same lock: none of its lines is lost
        keep_metrics_through(run.workdir, _kept_step(start))


def _kept_step(start: int) -> int:
    """The last step whose metrics stay: the restored one; none when the run starts afresh (-1)."""
    return start if start > 0 else -1


def train(config: ml_collections.ConfigDict, workdir: str, *, allow_config_change: bool = False,
          restore_fallback: bool = False, devices: Sequence[jax.Device] | None = None,
          profile_steps: ProfileWindow | None = None) -> dict[str, float]:
    """Trains (or resumes) the run in `workdir` on `devices` (default: all); returns the last logged train and
    eval metrics. `profile_steps`: write a jax.profiler trace of those updates to DIR/profile."""
    if profile_steps is not None:
        profile_steps.check(config.train.steps)
    record, changes = _resume_plan(config, workdir, allow_config_change)
    padded_vocab = run_record.saved_padded_vocab(record) if record is not None and changes is not None else None
    run = build_run(config, workdir, devices=devices, padded_vocab_size=padded_vocab)
    num_params = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(run.abstract_state.params))
    logging.info("model: %s parameters | mesh %s | %d devices (%s)", f"{num_params:,}", dict(run.mesh.shape),
                 jax.device_count(), jax.devices()[0].device_kind)
    peak = resolve_peak(config.train.peak_flops_per_device, run.model_config.dtype)
    logging.info("train/mfu peak: %s", f"{peak.flops_per_device / 1e12:.4g} TFLOP/s per device ({peak.source}: "
                 f"{peak.note})" if peak.flops_per_device else f"none ({peak.note})")
    checkpointer = Checkpointer(run.checkpoint_dir, keep=config.train.keep_checkpoints)
    stop_request = StopRequest()
    try:
        with jax.set_mesh(run.mesh), run.rules_context():
            state, start = _restore_or_init(run, checkpointer, restore_fallback)
            _record_start(run, record, start, changes, peak)
            writer = MetricsWriter(workdir, restart_step=_kept_step(start))
            if start == 0:
                writer.write(0, describe(run.data))
            try:
                profiler = StepProfiler(profile_steps, workdir) if profile_steps is not None else None
                loop = HostLoop(run, writer, checkpointer, peak, profiler)
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
    for record in read_run_metrics(workdir):
        if "source" not in record:  # the training run's own lines, not those evaluate appended
            latest.update({k: v for k, v in record.items() if k != "step"})
    return latest
