"""Training tasks, selected by `data.objective`: each owns its rows, batch spec, model inputs, loss and metrics
(`llm_jax.tasks.base.Task`)."""

from __future__ import annotations

import ml_collections

from llm_jax.registry import Registry
from llm_jax.tasks.base import Task
from llm_jax.tasks.causal_lm import CausalLM
from llm_jax.tasks.classification import SequenceClassification, TokenClassification
from llm_jax.tasks.masked_lm import MaskedLM
from llm_jax.tasks.seq2seq import Seq2Seq, SpanCorruption
from llm_jax.tasks.sft import SupervisedFineTuning

TASKS: Registry[type[Task]] = Registry("task")
for _task in (CausalLM, MaskedLM, SequenceClassification, TokenClassification, SupervisedFineTuning,
              SpanCorruption, Seq2Seq):
    TASKS.add(_task.name, _task)


def build_task(config: ml_collections.ConfigDict) -> Task:
    """The config's task, its family and settings checked (ConfigError naming the key)."""
    task = TASKS.get(config.data.objective)(config)
    task.validate()
    return task
