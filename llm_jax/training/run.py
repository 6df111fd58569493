"""Everything a run needs, built from a validated config: mesh, data, model, optimizer, shardings.

Shared by training, evaluation and generation so the three agree on the model and its layout.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

from absl import logging
import flax.linen as nn
import jax
import ml_collections
import optax
from jax.sharding import Mesh

from llm_jax import config as config_lib
from llm_jax.data.pipeline import LMData, build_data
from llm_jax.data.tokenizers import Tokenizer, load_tokenizer
from llm_jax.models.families import build_model
from llm_jax.models.attention_kernels import runnable_impl
from llm_jax.models.model_config import ModelConfig, build_model_config
from llm_jax.sharding import (Rules, batch_shardings, build_mesh, logical_rules, process_batch_rows,
                              vocab_shard_sizes)
from llm_jax.tasks import build_task
from llm_jax.tasks.base import Task, zeros_batch
from llm_jax.training.init_from import check_init_from
from llm_jax.training import run_record
from llm_jax.training.checkpoint import CHECKPOINTS_DIR
from llm_jax.training.optimizer import build_optimizer, frozen_mask
from llm_jax.training.state import TrainState, abstract_params, abstract_state, state_shardings
from llm_jax.training.steps import make_train_chunk, make_train_step

@dataclasses.dataclass
class Run:
    config: ml_collections.ConfigDict
    workdir: str
    mesh: Mesh
    rules: Rules
    tokenizer: Tokenizer
    data: LMData | None  # None when only the model is needed (generation)
    model_config: ModelConfig
    model: nn.Module
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    shardings: TrainState
    abstract_state: TrainState
    task: Task
    frozen: Any = None  # bool tree, True = kept fixed (train.freeze); None = everything trains

    @property
    def checkpoint_dir(self) -> str:
        return os.path.join(self.workdir, CHECKPOINTS_DIR)

    def rules_context(self):
        """Logical-axis rules must be active while model code is traced."""
        return nn.logical_axis_rules(self.rules)


def _check_vocab(config: ml_collections.ConfigDict, tokenizer: Tokenizer, extra_vocab: int = 0) -> None:
    """model.vocab_size, when set, is the tokenizer's; a task that reserves `extra_vocab` ids above it (an
    encoder-decoder's sentinels) may have more rows, never fewer (an imported T5: 32000 pieces, 100 sentinels and
    28 unused rows in 32128)."""
    vocab = config.model.vocab_size
    if extra_vocab and vocab is not None and vocab >= tokenizer.vocab_size + extra_vocab:
        return
    if vocab is not None and vocab != tokenizer.vocab_size:
        raise config_lib.ConfigError(
            f"model.vocab_size={config.model.vocab_size} does not match the {tokenizer.kind} tokenizer's "
            f"{tokenizer.vocab_size} ids (data.tokenizer={config.data.tokenizer!r}); leave model.vocab_size unset to "
            "follow the tokenizer (the embedding is padded to model.vocab_pad_multiple anyway)")


def build_run(config: ml_collections.ConfigDict, workdir: str, *, devices: Sequence[jax.Device] | None = None,
              saved_model_config: ModelConfig | None = None, with_data: bool = True,
              padded_vocab_size: int | None = None) -> Run:
    """Validates `config` against `devices` (default: all) and builds the run; raises ConfigError first.

    Without data the tokenizer comes from DIR/tokenizer (generation needs no training text). A resumed run passes
    its saved `padded_vocab_size` so the embedding keeps its shape on another mesh (checked to fit this one).
    """
    devices = list(devices or jax.devices())
    mesh_sizes = config_lib.validate(config, len(devices))
    task = build_task(config)
    if config.train.init_from and saved_model_config is None:
        check_init_from(config.train.init_from, config.model.family)
    mesh, rules = build_mesh(mesh_sizes, devices), logical_rules(config.mesh)
    tokenizer_dir = os.path.join(workdir, "tokenizer")
    data = None
    if with_data:
        rows = process_batch_rows(mesh, rules, config.train.batch_size)
        data = build_data(config, rows=rows, tokenizer_dir=tokenizer_dir)
        tokenizer = data.tokenizer
    else:
        tokenizer = load_tokenizer(tokenizer_dir)
    _check_vocab(config, tokenizer, task.extra_vocab())
    if saved_model_config is not None:  # a saved run read on another backend (cudnn-trained, CPU-evaluated) uses xla
        model_config = saved_model_config.replace(attention_impl=runnable_impl(saved_model_config))
        if model_config.attention_impl != saved_model_config.attention_impl:
            logging.info("model.attention_impl=%r does not run on the %s backend: using %r", saved_model_config
                         .attention_impl, jax.default_backend(), model_config.attention_impl)
    else:
        model_config = build_model_config(config.model, tokenizer.vocab_size + task.extra_vocab(),
                                          vocab_shard_sizes(mesh_sizes, rules), task.heads(), task.num_labels(),
                                          padded_vocab_size=padded_vocab_size)
    model = build_model(model_config)
    inputs = model_inputs_fn(task)
    params = nn.unbox(abstract_params(model, inputs))
    frozen = frozen_mask(params, config.train.freeze, model_config.num_layers) if config.train.freeze else None
    tx, schedule = build_optimizer(config.optimizer, config.train.steps, params, tuple(config.train.freeze),
                                   model_config.num_layers)
    with nn.logical_axis_rules(rules):
        shardings = state_shardings(model, tx, inputs, mesh, rules)
        abstract = abstract_state(model, tx, inputs, shardings)
    return Run(config, workdir, mesh, rules, tokenizer, data, model_config, model, tx, schedule, shardings, abstract,
               task, frozen)


def model_inputs_fn(task: Task):
    """() -> the model's keyword inputs for a batch of one of the task's spec (what init traces)."""
    return lambda: task.model_inputs(zeros_batch(task.batch_spec()))


def build_saved_run(workdir: str, *, with_data: bool) -> Run:
    """The run a training job left in `workdir`, on this machine's devices.

    The saved mesh is used when it fits the devices here; otherwise one device holds everything, which
    suits evaluation and sampling of the models that fit one device.
    """
    config, model_config = run_record.read_run_config(workdir)
    try:
        config_lib.validate(config, jax.device_count())
        devices = None
    except config_lib.ConfigError:
        config.mesh.update(data=1, fsdp=1, tensor=1)
        devices = jax.devices()[:1]
    return build_run(config, workdir, devices=devices, saved_model_config=model_config, with_data=with_data)


def jit_train_chunk(run: Run):
    """The jitted multi-step train function with the run's shardings and donated state; the host loop and
    the compile-only report lower the same function."""
    step = make_train_step(run.model, run.task, run.tx, run.schedule, run.config.optimizer.grad_accum_steps,
                           use_dropout=run.model_config.dropout > 0, frozen=run.frozen,
                           skip_nonfinite=run.config.train.nonfinite == "skip")
    return jax.jit(make_train_chunk(step),
                   in_shardings=(run.shardings, batch_shardings(run.mesh, run.rules, run.task.batch_spec(),
                                                                stacked=True)),
                   out_shardings=(run.shardings, None), donate_argnums=0)


def restore_latest_params(run: Run) -> tuple[int, Any]:
    """(step, params) of the run's latest checkpoint, on the run's mesh (what evaluate, generate, convert and
    llm_jax.load read). The params alone are read, so a run trained by any number of processes restores in
    this one (the data-iterator states are per process), and a missing checkpoints/ is not created."""
    from llm_jax.training.checkpoint import Checkpointer

    checkpointer = Checkpointer(run.checkpoint_dir, keep=run.config.train.keep_checkpoints, async_save=False,
                                read_only=True)
    try:
        with jax.set_mesh(run.mesh), run.rules_context():
            return checkpointer.restore_params(None, run.abstract_state.params)
    finally:
        checkpointer.close()
