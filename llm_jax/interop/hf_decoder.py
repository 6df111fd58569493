"""What the decoder-only converters (hf_gpt2, hf_llama) share: the model keys every causal LM import sets, the
keys an export needs, and the tokenizer an import writes (transformers' tokenizer files are not read: the user
names a tokenizer llm_jax reads, or the folder holds one)."""

from __future__ import annotations

import os
from typing import Any, Mapping

from llm_jax.interop.hf_common import ConversionError, ImportedTokenizer, check_required
from llm_jax.models.model_config import ModelConfig

FAMILY = "decoder"
IMPORT_SEQ_LEN = 128
# the keys every decoder-only Hugging Face model has in llm_jax, on import and required on export
DECODER_KEYS = dict(family=FAMILY, norm_position="pre", embedding_norm=False, type_vocab_size=0, pooler=False)
# keys whose default is what GPT-2 and Llama compute, checked on export where this llm_jax has them
EXPORT_DEFAULTS = dict(scale_attention_logits=True, scale_embeddings=False)


def check_decoder_exportable(cfg: ModelConfig, required: Mapping[str, Any], model: str) -> None:
    """`cfg` is a causal LM with the `required` keys of `model`, an lm head and head_dim * num_heads of any width;
    the error names the model key that is not."""
    present = {name: value for name, value in EXPORT_DEFAULTS.items() if hasattr(cfg, name)}
    check_required(cfg, {**DECODER_KEYS, **present, **required}, model)
    if "lm" not in cfg.heads:
        raise ConversionError(f"model heads {list(cfg.heads)}: {model} export needs the lm head (a causal LM run)")


def import_tokenizer(src: str, cfg: ModelConfig, kind: str | None, path: str, *, default_kind: str,
                     folder_file: str, hint: str) -> ImportedTokenizer:
    """The llm_jax tokenizer `kind` (default `default_kind`) from `path`, else from the folder's `folder_file`;
    its vocabulary must be the embedding's. Without one the error says what to pass (`hint`)."""
    from llm_jax.data.tokenizers import TOKENIZERS, FileBackedTokenizer

    kind = kind or default_kind
    if not path:
        candidate = os.path.join(src, folder_file) if folder_file else ""
        if not (candidate and os.path.isfile(candidate)):
            raise ConversionError(f"{src}: no tokenizer llm_jax reads{f' ({folder_file})' if folder_file else ''}; "
                                  f"{hint}")
        path = candidate
    file_kinds = [name for name in TOKENIZERS.names() if issubclass(TOKENIZERS.get(name), FileBackedTokenizer)]
    if kind not in file_kinds:
        raise ConversionError(f"--tokenizer={kind!r}: an import reads a tokenizer file; choose one of "
                              f"{', '.join(file_kinds)}")
    tokenizer = TOKENIZERS.get(kind).from_file(path, key="--tokenizer_path")
    if tokenizer.vocab_size != cfg.vocab_size:
        raise ConversionError(f"--tokenizer_path={path!r}: the {kind} tokenizer has {tokenizer.vocab_size} ids but the "
                              f"model's embeddings have {cfg.vocab_size} rows; pass a tokenizer of {cfg.vocab_size} "
                              "ids (--tokenizer=KIND --tokenizer_path=FILE)")
    data = dict(tokenizer=kind, tokenizer_path=os.path.abspath(path), objective="causal_lm",
                seq_len=min(IMPORT_SEQ_LEN, cfg.max_len))
    return ImportedTokenizer(tokenizer, data)


def eos_ids(special_ids: Mapping[str, int], vocab_size: int) -> dict[str, int | None]:
    """bos/eos ids of an exported config.json: the tokenizer's end-of-text id when it is in the vocabulary."""
    eos = special_ids.get("eos")
    eos = eos if isinstance(eos, int) and 0 <= eos < vocab_size else None
    bos = special_ids.get("bos", eos)
    return {"bos_token_id": bos if isinstance(bos, int) and 0 <= bos < vocab_size else None, "eos_token_id": eos}
