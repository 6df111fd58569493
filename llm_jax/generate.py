"""Generates text from the latest checkpoint of a run with the KV-cache decoding engine; results go to stdout,
logs to stderr.

    python -m llm_jax.generate --workdir=runs/shakespeare_char --prompt="ROMEO:" --max_new_tokens=300
    python -m llm_jax.generate --workdir=DIR --prompts_file=prompts.jsonl --beam_size=4 > completions.jsonl

With --prompt, stdout holds the continuation alone; with --prompts_file (a .txt file: one prompt per line; else
JSONL: a JSON string or {"prompt": ...} per line), one JSON object {"prompt", "completion"} per prompt, in order.
"""

from __future__ import annotations

import json
import sys

import jax
from absl import app, flags, logging

from llm_jax.cli import check_saved_run, quiet_library_logs, run_reporting_errors
from llm_jax.decoding import text
from llm_jax.decoding.engine import DecodeOptions
from llm_jax.errors import ConfigError
from llm_jax.training.run import build_saved_run, restore_latest_params

_WORKDIR = flags.DEFINE_string("workdir", None, "run directory written by llm_jax.train")
_PROMPT = flags.DEFINE_string("prompt", "\n", "text to continue")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "many prompts: a .txt file (one per line) or JSONL (a JSON "
                                    "string or {\"prompt\": ...} per line); writes JSONL to stdout")
# ranges are checked by DecodeOptions.check before the run is loaded, so each bad value is one line naming the flag
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 200, "tokens to generate per prompt (>= 1)")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "softmax temperature (>= 0); 0 = greedy")
_TOP_K = flags.DEFINE_integer("top_k", 0, "sample among the k most likely tokens (0 = all)")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "nucleus sampling mass in (0, 1] (1 = off)")
_BEAM_SIZE = flags.DEFINE_integer("beam_size", 1, "beam search with this many beams (1 = sampling or greedy)")
_LENGTH_PENALTY = flags.DEFINE_float("length_penalty", 0.0, "beam search's GNMT alpha: score / ((5 + len) / 6)^alpha")
_SEED = flags.DEFINE_integer("seed", 0, "sampling seed: the same seed gives the same text")
flags.mark_flag_as_required("workdir")


def decode_options() -> DecodeOptions:
    """The flags' decoding options, checked (a ConfigError names the flag)."""
    return DecodeOptions(_MAX_NEW_TOKENS.value, _TEMPERATURE.value, _TOP_K.value, _TOP_P.value, _BEAM_SIZE.value,
                         _LENGTH_PENALTY.value, _SEED.value).check()


def read_prompts() -> tuple[list[str], list[str] | None]:
    """(prompts, where each came from, for error messages) from --prompts_file or --prompt."""
    if _PROMPTS_FILE.value is None:
        if not _PROMPT.value:
            raise ConfigError("--prompt is empty: give text to continue (the default is a newline)")
        return [_PROMPT.value], ["--prompt"]
    if flags.FLAGS["prompt"].present:
        raise ConfigError("give --prompt or --prompts_file, not both")
    return text.read_prompts_file(_PROMPTS_FILE.value)


def generate(workdir: str, prompts: list[str], where: list[str] | None, options: DecodeOptions) -> list[str]:
    """The completion of each prompt from the latest checkpoint in `workdir`."""
    check_saved_run(workdir)
    run = build_saved_run(workdir, with_data=False)
    engine = text.engine_for(run.model_config, run.tokenizer)
    prompts_ids = text.encode_prompts(run.tokenizer, prompts, where)
    for note in text.truncation_notes(engine, prompts_ids, options):
        logging.warning("%s", note)
    step, params = restore_latest_params(run)
    logging.info("generating from step %d of %s (%s)", step, workdir, options.strategy)
    with jax.set_mesh(run.mesh), run.rules_context():
        new_tokens = engine.generate(params, prompts_ids, options)
    for ids, tokens in zip(prompts_ids, new_tokens):
        logging.info("sampled %d tokens after a %d-token prompt", len(tokens), len(ids))
    return [text.decode_completion(run.tokenizer, engine, tokens) for tokens in new_tokens]


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    quiet_library_logs()

    def generate_and_print() -> None:
        options = decode_options()
        prompts, where = read_prompts()
        completions = generate(_WORKDIR.value, prompts, where, options)
        if _PROMPTS_FILE.value is None:
            sys.stdout.write(completions[0] + "\n")
        else:
            for prompt, completion in zip(prompts, completions):
                sys.stdout.write(json.dumps({"prompt": prompt, "completion": completion}, ensure_ascii=False) + "\n")
        sys.stdout.flush()

    run_reporting_errors(generate_and_print, (FileNotFoundError, ValueError))


if __name__ == "__main__":
    app.run(main)
