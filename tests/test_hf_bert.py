"""Hugging Face BERT import/export: the encoder computes what transformers computes on randomly initialised
BERTs (padded batches with token types, real and padding positions, pooler, MLM and NSP heads); import ->
export -> import is exact and transformers loads the export with no missing or unexpected keys; bad folders
fail with one-line errors that name the file and tensor."""

from __future__ import annotations

import json
import os
import string
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO_ROOT, import_or_fail, subprocess_env
from llm_jax.interop import hf_bert
from llm_jax.interop.hf_bert import ConversionError
from llm_jax.models.families import build_model
from llm_jax.models.model_config import ModelConfig

transformers = import_or_fail("transformers")
torch = import_or_fail("torch")
from safetensors.numpy import load_file, save_file  # noqa: E402

TOLERANCE = 1e-4  # float32, max abs difference
SMALL = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
             max_position_embeddings=40, type_vocab_size=2, hidden_act="gelu")
WIDER = dict(vocab_size=130, hidden_size=48, num_hidden_layers=3, num_attention_heads=6, intermediate_size=64,
             max_position_embeddings=24, type_vocab_size=3, hidden_act="gelu_new", layer_norm_eps=1e-7)
SHAPES = {"2 layers d32 h4 gelu": SMALL, "3 layers d48 h6 gelu_new": WIDER}
LENGTHS = (11, 7, 3, 9)


def vocab_lines(size: int) -> list[str]:
    """A WordPiece vocabulary of `size` lines: BERT's specials, letters, their ## continuations, filler."""
    lines = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(string.ascii_lowercase)
    lines += [f"##{c}" for c in string.ascii_lowercase] + ["the", "cat", "sat", "on", "mat", ".", ","]
    lines += [f"[unused{i}]" for i in range(size - len(lines))]
    return lines[:size]


def random_bert(cls: type, seed: int = 0, **config):
    """A transformers BERT of `cls` with every parameter perturbed away from its init (LayerNorm weights
    near 1, biases non-zero), in eval mode."""
    torch.manual_seed(seed)
    model = cls(transformers.BertConfig(**config)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model


def save_hf_folder(model, directory: str) -> str:
    """save_pretrained plus a vocab.txt and tokenizer_config.json, as a Hub folder has them."""
    model.save_pretrained(directory)
    with open(os.path.join(directory, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab_lines(model.config.vocab_size)) + "\n")
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"do_lower_case": True, "tokenizer_class": "BertTokenizer"}, f)
    return directory


def padded_batch(vocab: int, type_vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Rows of LENGTHS real tokens padded to the longest, token types 0..type_vocab-1 on real tokens."""
    rng = np.random.default_rng(seed)
    B, T = len(LENGTHS), max(LENGTHS)
    mask_BT = (np.arange(T)[None, :] < np.array(LENGTHS)[:, None]).astype(np.int32)
    ids_BT = np.where(mask_BT, rng.integers(5, vocab, (B, T)), 0).astype(np.int32)
    types_BT = np.where(mask_BT, np.minimum(np.arange(T)[None, :] * type_vocab // T, type_vocab - 1), 0)
    return {"input_ids": ids_BT, "attention_mask": mask_BT, "token_type_ids": types_BT.astype(np.int32)}


def torch_outputs(model, batch: dict[str, np.ndarray]):
    with torch.no_grad():
        return model(**{name: torch.tensor(value, dtype=torch.long) for name, value in batch.items()})


def numpy_state_dict(model) -> dict[str, np.ndarray]:
    return {name: tensor.detach().numpy().copy() for name, tensor in model.state_dict().items()}


def imported(model) -> tuple[ModelConfig, dict]:
    """(model config, params) of a transformers BERT through hf_bert alone."""
    state_dict = numpy_state_dict(model)
    cfg = ModelConfig(**hf_bert.model_config_from_hf(model.config.to_dict(), tensor_names=state_dict))
    return cfg, hf_bert.hf_to_params(state_dict, cfg)


def our_outputs(cfg: ModelConfig, params: dict, batch: dict[str, np.ndarray]):
    """The encoder on `batch`: segment ids from the mask, positions 0..T-1 as transformers counts them."""
    ids_BT = jnp.asarray(batch["input_ids"])
    positions_BT = jnp.broadcast_to(jnp.arange(ids_BT.shape[1]), ids_BT.shape)
    return build_model(cfg).apply({"params": params}, ids_BT, positions_BT, jnp.asarray(batch["attention_mask"]),
                                  jnp.asarray(batch["token_type_ids"]), deterministic=True)


def max_diff(ours, theirs, where=None) -> float:
    difference = np.abs(np.asarray(ours, np.float32) - np.asarray(theirs, np.float32))
    return float(difference[where].max() if where is not None else difference.max())


@pytest.fixture(scope="module", params=list(SHAPES), ids=list(SHAPES))
def bert_model(request):
    config = SHAPES[request.param]
    model = random_bert(transformers.BertModel, **config)
    cfg, params = imported(model)
    batch = padded_batch(config["vocab_size"], config["type_vocab_size"])
    return request.param, model, cfg, params, batch, torch_outputs(model, batch), our_outputs(cfg, params, batch)


@pytest.fixture(scope="module")
def pretraining_model():
    return random_bert(transformers.BertForPreTraining, seed=1, **SMALL)


def test_model_config_from_hf_reads_every_key(bert_model):
    name, model, cfg, *_ = bert_model
    hf = model.config
    assert (cfg.family, cfg.num_layers, cfg.num_heads, cfg.d_model, cfg.d_ff, cfg.max_len) == (
        "encoder", hf.num_hidden_layers, hf.num_attention_heads, hf.hidden_size, hf.intermediate_size,
        hf.max_position_embeddings)
    assert cfg.vocab_size == hf.vocab_size and cfg.padded_vocab_size % 128 == 0
    assert cfg.type_vocab_size == hf.type_vocab_size and cfg.norm_eps == hf.layer_norm_eps
    assert cfg.activation == {"gelu": "gelu", "gelu_new": "gelu_tanh"}[hf.hidden_act]
    assert cfg.heads == () and cfg.pooler and cfg.norm_position == "post" and cfg.embedding_norm


def test_hidden_states_equal_transformers_at_real_tokens(bert_model):
    name, model, cfg, params, batch, theirs, ours = bert_model
    real = batch["attention_mask"].astype(bool)
    difference = max_diff(ours.hidden_BTD, theirs.last_hidden_state.numpy(), real)
    print(f"\n[{name}] last_hidden_state max abs diff at real tokens: {difference:.2e}")
    assert difference <= TOLERANCE


def test_hidden_states_equal_transformers_at_padding(bert_model):
    name, model, cfg, params, batch, theirs, ours = bert_model
    padding = ~batch["attention_mask"].astype(bool)
    difference = max_diff(ours.hidden_BTD, theirs.last_hidden_state.numpy(), padding)
    print(f"\n[{name}] last_hidden_state max abs diff at padding: {difference:.2e}")
    assert difference <= TOLERANCE, (
        "padding query rows differ from transformers: they must read every real key and no padding key "
        "(llm_jax.models.attention.attention_mask)")


def test_pooled_output_equals_transformers(bert_model):
    name, model, cfg, params, batch, theirs, ours = bert_model
    difference = max_diff(ours.pooled_BD, theirs.pooler_output.numpy())
    print(f"\n[{name}] pooler_output max abs diff: {difference:.2e}")
    assert difference <= TOLERANCE


def test_pretraining_heads_equal_transformers(pretraining_model):
    cfg, params = imported(pretraining_model)
    assert cfg.heads == ("mlm", "nsp") and cfg.pooler
    batch = padded_batch(SMALL["vocab_size"], SMALL["type_vocab_size"], seed=1)
    theirs, ours = torch_outputs(pretraining_model, batch), our_outputs(cfg, params, batch)
    real = batch["attention_mask"].astype(bool)  # padding rows: test_hidden_states_equal_transformers_at_padding
    mlm = max_diff(np.asarray(ours.heads["mlm"])[..., :cfg.vocab_size], theirs.prediction_logits.numpy(), real)
    nsp = max_diff(ours.heads["nsp"], theirs.seq_relationship_logits.numpy())
    print(f"\nBertForPreTraining max abs diff: MLM logits at real tokens {mlm:.2e}, NSP logits {nsp:.2e}")
    assert mlm <= TOLERANCE and nsp <= TOLERANCE
    assert np.all(np.asarray(ours.heads["mlm"])[..., cfg.vocab_size:] < -1e30)  # padding rows masked


def test_state_dict_round_trip_is_exact(pretraining_model):
    state_dict = numpy_state_dict(pretraining_model)
    cfg, params = imported(pretraining_model)
    assert not np.any(params["token_embedding"]["embedding"][cfg.vocab_size:])  # padding rows are zeros
    exported = hf_bert.params_to_hf(params, cfg)
    kept = {name for name in state_dict if not name.endswith("position_ids") and name not in hf_bert.TIED_DECODER}
    assert set(exported) == kept
    for name in kept:
        np.testing.assert_array_equal(exported[name], state_dict[name], err_msg=name)
    again = hf_bert.hf_to_params(exported, cfg)
    jax.tree.map(np.testing.assert_array_equal, again, params)


def test_bare_state_dict_without_prefix_and_tf_layernorm_names():
    model = random_bert(transformers.BertModel, **SMALL)
    state_dict = {name.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): t
                  for name, t in numpy_state_dict(model).items()}
    cfg = ModelConfig(**hf_bert.model_config_from_hf(model.config.to_dict(), tensor_names=state_dict))
    params = hf_bert.hf_to_params(state_dict, cfg)
    np.testing.assert_array_equal(params["embedding_norm"]["scale"],
                                  model.embeddings.LayerNorm.weight.detach().numpy())


# ----------------------------------------------------------------------------- folders and the command


@pytest.fixture(scope="module")
def pretraining_folder(pretraining_model, tmp_path_factory) -> str:
    return save_hf_folder(pretraining_model, str(tmp_path_factory.mktemp("hf_pretraining")))


def test_convert_round_trip_loads_in_transformers(pretraining_folder, pretraining_model, tmp_path):
    from llm_jax.convert import export_hf

    workdir, dst = str(tmp_path / "run"), str(tmp_path / "exported")
    result = subprocess.run([sys.executable, "-m", "llm_jax.convert", "--from=hf", f"--src={pretraining_folder}",
                             f"--workdir={workdir}"], cwd=REPO_ROOT, env=subprocess_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(os.listdir(workdir)) == ["checkpoints", "config.json", "tokenizer"]
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["0"]
    hf_config = export_hf(workdir, dst)
    assert hf_config["architectures"] == ["BertForPreTraining"]
    loaded, info = transformers.BertForPreTraining.from_pretrained(dst, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    for name, tensor in pretraining_model.state_dict().items():
        np.testing.assert_array_equal(loaded.state_dict()[name].numpy(), tensor.numpy(), err_msg=name)
    with open(os.path.join(pretraining_folder, "vocab.txt"), "rb") as source, \
            open(os.path.join(dst, "vocab.txt"), "rb") as exported:
        assert source.read() == exported.read()
    first = hf_bert.hf_to_params(load_file(os.path.join(pretraining_folder, "model.safetensors")),
                                 ModelConfig(**hf_bert.model_config_from_hf(hf_config)))
    again = hf_bert.hf_to_params(load_file(os.path.join(dst, "model.safetensors")),
                                 ModelConfig(**hf_bert.model_config_from_hf(hf_config)))
    jax.tree.map(np.testing.assert_array_equal, again, first)


def test_bert_model_export_loads_as_bert_model(tmp_path):
    from llm_jax.convert import export_hf, import_hf

    model = random_bert(transformers.BertModel, seed=2, **SMALL)
    src = save_hf_folder(model, str(tmp_path / "hf"))
    import_hf(src, str(tmp_path / "run"))
    assert export_hf(str(tmp_path / "run"), str(tmp_path / "out"))["architectures"] == ["BertModel"]
    loaded, info = transformers.BertModel.from_pretrained(str(tmp_path / "out"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    for name, tensor in model.state_dict().items():
        np.testing.assert_array_equal(loaded.state_dict()[name].numpy(), tensor.numpy(), err_msg=name)


def _edit_config(folder: str, **changes) -> None:
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        values = json.load(f)
    values.update(changes)
    with open(path, "w") as f:
        json.dump(values, f)


@pytest.fixture
def broken_folder(pretraining_model, tmp_path) -> str:
    return save_hf_folder(pretraining_model, str(tmp_path / "hf"))


def _import_error(src: str, workdir: str) -> str:
    from llm_jax.convert import import_hf

    with pytest.raises((ConversionError, ValueError)) as error:
        import_hf(src, workdir)
    assert not os.path.exists(workdir), "a failed import must not write the work directory"
    message = str(error.value)
    assert "\n" not in message
    return message


def test_shape_mismatch_names_tensor_and_shapes(broken_folder, tmp_path):
    _edit_config(broken_folder, intermediate_size=40)
    message = _import_error(broken_folder, str(tmp_path / "run"))
    assert "model.safetensors: tensor bert.encoder.layer.0.intermediate.dense.weight has shape (37, 32)" in message
    assert "config.json implies (40, 32)" in message


def test_vocab_mismatch_names_both_counts(broken_folder, tmp_path):
    with open(os.path.join(broken_folder, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab_lines(SMALL["vocab_size"])[:-1]) + "\n")
    message = _import_error(broken_folder, str(tmp_path / "run"))
    assert message.endswith(f"vocab.txt has {SMALL['vocab_size'] - 1} tokens but embeddings have "
                            f"{SMALL['vocab_size']} rows")


def test_unsupported_model_type_and_architecture(broken_folder, tmp_path):
    _edit_config(broken_folder, model_type="roberta")
    assert "config.json: model_type='roberta' is not supported" in _import_error(broken_folder, str(tmp_path / "a"))
    _edit_config(broken_folder, model_type="bert", architectures=["BertForSequenceClassification"])
    assert "['BertForSequenceClassification'] are not supported" in _import_error(broken_folder, str(tmp_path / "b"))


def test_missing_tensor_fails_in_one_line_from_the_command(broken_folder, tmp_path):
    path = os.path.join(broken_folder, "model.safetensors")
    tensors = load_file(path)
    del tensors["bert.encoder.layer.1.output.dense.bias"]
    save_file(tensors, path, metadata={"format": "pt"})
    assert "missing tensors bert.encoder.layer.1.output.dense.bias" in _import_error(broken_folder,
                                                                                     str(tmp_path / "run"))
    result = subprocess.run([sys.executable, "-m", "llm_jax.convert", "--from=hf", f"--src={broken_folder}",
                             f"--workdir={tmp_path / 'cli'}"], cwd=REPO_ROOT, env=subprocess_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "model.safetensors: missing tensors bert.encoder.layer.1.output" in last


def test_export_refuses_models_bert_cannot_compute():
    decoder = ModelConfig(family="decoder", vocab_size=99, use_bias=True)
    with pytest.raises(ConversionError, match="model.family='decoder': BERT needs family='encoder'"):
        hf_bert.hf_config_from_model(decoder)
    encoder = ModelConfig(**hf_bert.model_config_from_hf(transformers.BertConfig(**SMALL).to_dict()))
    with pytest.raises(ConversionError, match="model.norm_position='pre': BERT needs norm_position='post'"):
        hf_bert.params_to_hf({}, encoder.replace(norm_position="pre"))
