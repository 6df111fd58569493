"""Samples text from the latest checkpoint of a run; the sample alone goes to stdout, logs to stderr.

    python -m llm_jax.generate --workdir=runs/shakespeare_char --prompt="ROMEO:" --max_new_tokens=300
"""

from __future__ import annotations

import math
import sys

import jax
from absl import app, flags, logging

from llm_jax.cli import check_saved_run, quiet_library_logs, run_reporting_errors
from llm_jax.decoding.sampling import SamplingConfig, lm_logits, sample
from llm_jax.errors import ConfigError
from llm_jax.training.run import build_saved_run, restore_latest_params

_WORKDIR = flags.DEFINE_string("workdir", None, "run directory written by llm_jax.train")
_PROMPT = flags.DEFINE_string("prompt", "\n", "text to continue")
# ranges are checked by sampling_config, so each bad value is one line naming the flag
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 200, "tokens to sample (>= 1)")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "softmax temperature (>= 0); 0 = greedy")
_TOP_K = flags.DEFINE_integer("top_k", 0, "sample among the k most likely tokens (0 = all)")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "nucleus sampling mass in (0, 1] (1 = off)")
_SEED = flags.DEFINE_integer("seed", 0, "sampling seed: the same seed gives the same text")
flags.mark_flag_as_required("workdir")


def sampling_config(max_new_tokens: int, temperature: float, top_k: int, top_p: float, seed: int) -> SamplingConfig:
    """The sampling settings, checked before the run is loaded: a value that cannot sample is a ConfigError
    naming its flag (top_p=0 would keep no token, a negative temperature inverts the distribution)."""
    problems = [(max_new_tokens >= 1, f"--max_new_tokens={max_new_tokens}: sample at least 1 token"),
                (math.isfinite(temperature) and temperature >= 0,
                 f"--temperature={temperature}: give a temperature >= 0 (0 = greedy)"),
                (top_k >= 0, f"--top_k={top_k}: give k >= 0 (0 = every token)"),
                (0 < top_p <= 1, f"--top_p={top_p}: give a probability mass in (0, 1] (1 = off)")]
    for ok, message in problems:
        if not ok:
            raise ConfigError(message)
    return SamplingConfig(max_new_tokens, temperature, top_k, top_p, seed)


def generate_text(workdir: str, prompt: str, sampling: SamplingConfig) -> str:
    """The prompt's continuation (without the prompt) from the latest checkpoint in `workdir`."""
    check_saved_run(workdir)
    run = build_saved_run(workdir, with_data=False)
    if "lm" not in run.model_config.heads:
        raise ValueError(f"{workdir} holds a {run.model_config.family} model without a language-model head: "
                         "generate samples from causal LMs (model.family=decoder)")
    step, params = restore_latest_params(run)
    logging.info("sampling from step %d of %s", step, workdir)
    prompt_ids = [int(i) for i in run.tokenizer.encode(prompt)]
    with jax.set_mesh(run.mesh), run.rules_context():
        tokens = sample(lm_logits(run.model), params, prompt_ids, max_len=run.model_config.max_len,
                        vocab_size=run.model_config.vocab_size, sampling=sampling)
    logging.info("sampled %d tokens after a %d-token prompt", len(tokens) - len(prompt_ids), len(prompt_ids))
    return run.tokenizer.decode(tokens[len(prompt_ids):])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    quiet_library_logs()

    def generate_and_print() -> None:
        sampling = sampling_config(_MAX_NEW_TOKENS.value, _TEMPERATURE.value, _TOP_K.value, _TOP_P.value,
                                   _SEED.value)
        if not _PROMPT.value:
            raise ConfigError("--prompt is empty: give text to continue (the default is a newline)")
        sys.stdout.write(generate_text(_WORKDIR.value, _PROMPT.value, sampling) + "\n")
        sys.stdout.flush()

    run_reporting_errors(generate_and_print, (FileNotFoundError, ValueError))


if __name__ == "__main__":
    app.run(main)
