"""Hugging Face GPT-2 and Llama import/export: the decoder computes the logits transformers computes on randomly
initialised models of several shapes (odd vocabularies, GQA/MQA, explicit head_dim, tied and untied outputs,
both layer layouts); import -> llm_jax.load -> export -> transformers' from_pretrained loads with no missing or
unexpected keys and gives the same logits; bad folders and configs fail with one-line errors that name the entry
(an unsupported architecture before any weight is read), and special ids past a small vocabulary only warn."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO_ROOT, import_or_fail, subprocess_env
from llm_jax.interop import architectures, hf_gpt2, hf_llama
from llm_jax.interop.hf_common import ConversionError
from llm_jax.models.families import build_model
from llm_jax.models.model_config import make_model_config

pytestmark = pytest.mark.slow  # run with --slow (README); the default suite stays under 15 min

transformers = import_or_fail("transformers")
torch = import_or_fail("torch")

TOLERANCE = 1e-4  # float32, max abs difference of the logits
DATA = os.path.normpath(os.path.join(REPO_ROOT, "..", "shared", "data"))
GPT2_RANKS, SPM_1000 = os.path.join(DATA, "gpt2.tiktoken"), os.path.join(DATA, "botchan_unigram_1000.model")
GPT2_SHAPES = {
    "gpt2 2 layers d32 h4 V99 gelu_new": dict(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=24),
    "gpt2 3 layers d48 h6 V131 F40 gelu eps1e-6 reorder": dict(
        vocab_size=131, n_embd=48, n_layer=3, n_head=6, n_positions=16, n_inner=40, activation_function="gelu",
        layer_norm_epsilon=1e-6, reorder_and_upcast_attn=True),
}
LLAMA_SHAPES = {
    "llama 2 layers d32 h4 kv2 V99 untied": dict(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=40, max_position_embeddings=32, tie_word_embeddings=False),
    "llama 3 layers d48 h6 kv1 H12 V77 tied theta5e5": dict(
        vocab_size=77, hidden_size=48, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=1,
        head_dim=12, intermediate_size=64, max_position_embeddings=16, tie_word_embeddings=True,
        rope_theta=500000.0, rms_norm_eps=1e-5),
}
MAX_DIFFS: dict[str, float] = {}


def random_model(cls: type, config_cls: type, seed: int = 0, **config):
    """A transformers model with every parameter perturbed away from its init (norm weights near 1, projections
    larger than at init), in eval mode, float32."""
    torch.manual_seed(seed)
    model = cls(config_cls(**config)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model


def random_gpt2(seed: int = 0, **config):
    return random_model(transformers.GPT2LMHeadModel, transformers.GPT2Config, seed, **config)


def random_llama(seed: int = 0, **config):
    return random_model(transformers.LlamaForCausalLM, transformers.LlamaConfig, seed, **config)


def numpy_state_dict(model) -> dict[str, np.ndarray]:
    return {name: tensor.detach().numpy().copy() for name, tensor in model.state_dict().items()}


def token_ids(vocab: int, rows: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (rows, length)).astype(np.int32)


def torch_logits(model, ids_BT: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids_BT, dtype=torch.long)).logits.numpy()


def our_logits(module, model, ids_BT: np.ndarray, scan_layers: bool = False) -> np.ndarray:
    """Import through the converter module alone (no folder), then the decoder's lm logits."""
    fields = module.model_config_from_hf(model.config.to_dict())
    cfg = make_model_config(**fields).replace(scan_layers=scan_layers)
    params = module.hf_to_params(numpy_state_dict(model), cfg)
    outputs = build_model(cfg).apply({"params": params}, jnp.asarray(ids_BT), deterministic=True)
    return np.asarray(outputs.heads["lm"])[..., :cfg.vocab_size]


def record(name: str, difference: float) -> None:
    MAX_DIFFS[name] = difference
    print(f"\n[{name}] logits max abs diff vs transformers: {difference:.2e}")


@pytest.mark.parametrize("name", list(GPT2_SHAPES))
def test_gpt2_logits_equal_transformers(name):
    config = GPT2_SHAPES[name]
    model = random_gpt2(**config)
    ids_BT = token_ids(config["vocab_size"], 3, config["n_positions"] - 3)
    difference = float(np.abs(our_logits(hf_gpt2, model, ids_BT) - torch_logits(model, ids_BT)).max())
    record(name, difference)
    assert difference <= TOLERANCE


@pytest.mark.parametrize("name", list(LLAMA_SHAPES))
def test_llama_logits_equal_transformers(name):
    config = LLAMA_SHAPES[name]
    model = random_llama(**config)
    ids_BT = token_ids(config["vocab_size"], 3, config["max_position_embeddings"] - 2)
    scan_layers = config["num_hidden_layers"] == 3  # one shape in each layer layout
    difference = float(np.abs(our_logits(hf_llama, model, ids_BT, scan_layers) - torch_logits(model, ids_BT)).max())
    record(name + (" scanned" if scan_layers else ""), difference)
    assert difference <= TOLERANCE


def test_config_keys_map_to_model_keys():
    gpt2 = make_model_config(**hf_gpt2.model_config_from_hf(transformers.GPT2Config(
        **GPT2_SHAPES["gpt2 3 layers d48 h6 V131 F40 gelu eps1e-6 reorder"]).to_dict()))
    assert (gpt2.family, gpt2.positional, gpt2.norm, gpt2.norm_position, gpt2.mlp, gpt2.activation) == (
        "decoder", "learned", "layernorm", "pre", "standard", "gelu")
    assert (gpt2.d_ff, gpt2.max_len, gpt2.norm_eps, gpt2.use_bias, gpt2.tie_embeddings) == (40, 16, 1e-6, True, True)
    llama = make_model_config(**hf_llama.model_config_from_hf(transformers.LlamaConfig(
        **LLAMA_SHAPES["llama 3 layers d48 h6 kv1 H12 V77 tied theta5e5"]).to_dict()))
    assert (llama.positional, llama.norm, llama.mlp, llama.activation, llama.use_bias) == (
        "rope", "rmsnorm", "gated", "silu", False)
    assert (llama.num_kv_heads, llama.head_dim, llama.rope_base, llama.norm_eps, llama.tie_embeddings) == (
        1, 12, 500000.0, 1e-5, True)


def test_gpt2_model_without_prefix_imports_the_same_params():
    model = random_gpt2(**GPT2_SHAPES["gpt2 2 layers d32 h4 V99 gelu_new"])
    cfg = make_model_config(**hf_gpt2.model_config_from_hf(model.config.to_dict()))
    bare = {name[len("transformer."):]: tensor for name, tensor in numpy_state_dict(model).items()
            if name.startswith("transformer.")}
    ours, theirs = hf_gpt2.hf_to_params(bare, cfg), hf_gpt2.hf_to_params(numpy_state_dict(model), cfg)
    assert jnp.all(jnp.asarray(ours["block_1"]["attention"]["value"]["kernel"])
                   == jnp.asarray(theirs["block_1"]["attention"]["value"]["kernel"]))


# ----------------------------------------------------------------------------- folders: import, load, export


def save_folder(model, directory: str) -> str:
    model.save_pretrained(directory)
    return directory


def export_and_reload(workdir: str, dst: str, cls: type, ids_BT: np.ndarray) -> np.ndarray:
    """convert --to=hf, then transformers' from_pretrained with no missing or unexpected keys; its logits."""
    from llm_jax.convert import export_hf

    export_hf(workdir, dst)
    reloaded, info = cls.from_pretrained(dst, output_loading_info=True)
    assert not any(info[kind] for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return torch_logits(reloaded.eval(), ids_BT)


def test_gpt2_folder_round_trip_with_ids_outside_the_vocabulary(tmp_path, caplog):
    """A 1000-id GPT2Config keeps eos_token_id=50256: a warning; the import takes a 1000-piece tokenizer."""
    import llm_jax
    from llm_jax.convert import import_hf

    model = random_gpt2(seed=1, vocab_size=1000, n_embd=32, n_layer=2, n_head=4, n_positions=20)
    workdir = str(tmp_path / "run")
    with caplog.at_level(logging.WARNING):
        import_hf(save_folder(model, str(tmp_path / "hf")), workdir, tokenizer="sentencepiece",
                  tokenizer_path=SPM_1000)
    assert "eos_token_id=50256 is outside the 1000-id vocabulary" in caplog.text
    loaded = llm_jax.load(workdir)
    assert loaded.config.data.tokenizer == "sentencepiece" and loaded.config.data.objective == "causal_lm"
    ids_BT = token_ids(1000, 2, 20, seed=2)
    theirs = torch_logits(model, ids_BT)
    record("gpt2 folder -> llm_jax.load", float(np.abs(loaded.logits(ids_BT.tolist()) - theirs).max()))
    assert MAX_DIFFS["gpt2 folder -> llm_jax.load"] <= TOLERANCE
    exported = export_and_reload(workdir, str(tmp_path / "out"), transformers.GPT2LMHeadModel, ids_BT)
    record("gpt2 import -> export -> transformers", float(np.abs(exported - theirs).max()))
    assert MAX_DIFFS["gpt2 import -> export -> transformers"] <= TOLERANCE


def test_gpt2_import_uses_gpt2_bpe_and_generates(tmp_path):
    import llm_jax
    from llm_jax.convert import import_hf

    model = random_gpt2(seed=2, vocab_size=50257, n_embd=16, n_layer=1, n_head=2, n_positions=16)
    workdir = str(tmp_path / "run")
    import_hf(save_folder(model, str(tmp_path / "hf")), workdir, tokenizer_path=GPT2_RANKS)
    loaded = llm_jax.load(workdir)
    assert loaded.config.data.tokenizer == "gpt2_bpe" and loaded.tokenizer.vocab_size == 50257
    ids_BT = loaded.tokenizer.encode("Hello world, hello")[None]
    difference = float(np.abs(loaded.logits(ids_BT) - torch_logits(model, ids_BT)).max())
    record("gpt2 V50257 gpt2_bpe -> llm_jax.load", difference)
    assert difference <= TOLERANCE
    greedy = int(np.argmax(torch_logits(model, ids_BT)[0, -1]))
    assert loaded.generate("Hello world, hello", max_new_tokens=1, temperature=0.0) == loaded.tokenizer.decode([greedy])


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_llama_folder_round_trip(tmp_path, tie):
    import llm_jax
    from llm_jax.convert import import_hf

    model = random_llama(seed=3, vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=48, max_position_embeddings=24,
                         tie_word_embeddings=tie)
    workdir = str(tmp_path / "run")
    import_hf(save_folder(model, str(tmp_path / "hf")), workdir, tokenizer_path=SPM_1000)
    loaded = llm_jax.load(workdir)
    ids_BT = token_ids(1000, 2, 24, seed=4)
    theirs = torch_logits(model, ids_BT)
    name = f"llama {'tied' if tie else 'untied'}"
    record(f"{name} folder -> llm_jax.load", float(np.abs(loaded.logits(ids_BT) - theirs).max()))
    exported = export_and_reload(workdir, str(tmp_path / "out"), transformers.LlamaForCausalLM, ids_BT)
    record(f"{name} import -> export -> transformers", float(np.abs(exported - theirs).max()))
    assert max(MAX_DIFFS[f"{name} folder -> llm_jax.load"], MAX_DIFFS[f"{name} import -> export -> transformers"]) \
        <= TOLERANCE
    with open(os.path.join(tmp_path, "out", "config.json")) as f:
        assert json.load(f)["tie_word_embeddings"] is tie


def test_decoder_logits_take_rectangular_ids_in_the_vocabulary(tmp_path):
    import llm_jax
    from llm_jax.convert import import_hf

    model = random_llama(seed=5, vocab_size=1000, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=16, max_position_embeddings=8)
    workdir = str(tmp_path / "run")
    import_hf(save_folder(model, str(tmp_path / "hf")), workdir, tokenizer_path=SPM_1000)
    loaded = llm_jax.load(workdir)
    for bad, message in (([[1, 2, 3], [4, 5]], "shape \\[B, T\\]"), ([[1, 1000]], "outside the model's vocabulary"),
                         ([list(range(9))], "model.max_len=8"), ("some text", "shape \\[B, T\\]")):
        with pytest.raises(ValueError, match=message):
            loaded.logits(bad)


# ----------------------------------------------------------------------------- bad input


def _import_error(src: str, workdir: str, **kwargs) -> str:
    from llm_jax.convert import import_hf

    with pytest.raises(ValueError) as error:
        import_hf(src, workdir, **kwargs)
    assert not os.path.exists(workdir), "a failed import must not write the work directory"
    assert "\n" not in str(error.value)
    return str(error.value)


def test_unsupported_architecture_fails_before_weights_in_one_line(tmp_path):
    src = tmp_path / "hf"
    src.mkdir()  # no weights at all: the architecture is checked first
    (src / "config.json").write_text(json.dumps({"architectures": ["MistralForCausalLM"], "model_type": "mistral"}))
    message = _import_error(str(src), str(tmp_path / "run"))
    assert "architectures ['MistralForCausalLM'] are not supported" in message
    for name in ("BertModel", "GPT2LMHeadModel", "GPT2Model", "LlamaForCausalLM"):
        assert name in message
    result = subprocess.run([sys.executable, "-m", "llm_jax.convert", "--from=hf", f"--src={src}",
                             f"--workdir={tmp_path / 'cli'}"], cwd=REPO_ROOT, env=subprocess_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and "MistralForCausalLM" in result.stderr


def test_tokenizer_problems_say_what_to_pass(tmp_path):
    llama = save_folder(random_llama(vocab_size=99, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=16), str(tmp_path / "llama"))
    assert "pass --tokenizer_path=a SentencePiece .model" in _import_error(llama, str(tmp_path / "a"))
    assert ("the sentencepiece tokenizer has 1000 ids but the model's embeddings have 99 rows"
            in _import_error(llama, str(tmp_path / "b"), tokenizer_path=SPM_1000))
    assert "--tokenizer='char': an import reads a tokenizer file; choose one of gpt2_bpe, sentencepiece" in (
        _import_error(llama, str(tmp_path / "d"), tokenizer="char", tokenizer_path=SPM_1000))
    gpt2 = save_folder(random_gpt2(vocab_size=99, n_embd=16, n_layer=1, n_head=2), str(tmp_path / "gpt2"))
    assert "--tokenizer_path=GPT-2's tiktoken ranks file" in _import_error(gpt2, str(tmp_path / "c"))


def _gpt2_config(**changes) -> dict:
    return {**transformers.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4).to_dict(), **changes}


def _llama_config(**changes) -> dict:
    config = transformers.LlamaConfig(**LLAMA_SHAPES["llama 2 layers d32 h4 kv2 V99 untied"]).to_dict()
    return {**config, **changes}


@pytest.mark.parametrize("module, config, message", [
    (hf_gpt2, _gpt2_config(activation_function="tanh"), "activation_function='tanh' is not supported; one of gelu"),
    (hf_gpt2, _gpt2_config(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx=True is not"),
    (hf_gpt2, _gpt2_config(scale_attn_weights=False), "scale_attn_weights=False is not supported"),
    (hf_gpt2, _gpt2_config(tie_word_embeddings=False), "tie_word_embeddings=False is not supported"),
    (hf_gpt2, _gpt2_config(n_head=5), "n_head=5 does not divide n_embd=32"),
    (hf_llama, _llama_config(hidden_act="gelu_fast"), "hidden_act='gelu_fast' is not supported"),
    (hf_llama, _llama_config(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}),
     "rope_parameters rope_type='linear' is not supported"),
    (hf_llama, _llama_config(rope_scaling={"type": "dynamic", "factor": 2.0}),
     "rope_scaling rope_type='dynamic' is not supported"),
    (hf_llama, _llama_config(attention_bias=True), "attention_bias=true is not supported"),
    (hf_llama, _llama_config(num_key_value_heads=3), "num_key_value_heads=3 does not divide"),
    (hf_llama, _llama_config(model_type="mistral"), "model_type='mistral' is not supported"),
], ids=["gpt2 activation", "gpt2 layer-idx scaling", "gpt2 unscaled", "gpt2 untied", "gpt2 heads",
        "llama activation", "llama rope_parameters", "llama rope_scaling", "llama bias", "llama kv heads",
        "llama model_type"])
def test_unsupported_configs_name_the_entry(module, config, message):
    with pytest.raises(ConversionError, match=message.replace("(", "\\(")):
        module.model_config_from_hf(config, source="config.json")


def test_export_refuses_decoders_no_architecture_computes():
    gpt2 = make_model_config(**hf_gpt2.model_config_from_hf(_gpt2_config()))
    with pytest.raises(ConversionError, match="model.positional='alibi': no Hugging Face architecture"):
        architectures.for_model(gpt2.replace(positional="alibi"))
    with pytest.raises(ConversionError, match="model.norm='rmsnorm': GPT2LMHeadModel needs norm='layernorm'"):
        architectures.for_model(gpt2).hf_config_from_model(gpt2.replace(norm="rmsnorm"), {})
    llama = make_model_config(**hf_llama.model_config_from_hf(_llama_config()))
    with pytest.raises(ConversionError, match="model.mlp='standard': LlamaForCausalLM needs mlp='gated'"):
        architectures.for_model(llama).params_to_hf({}, llama.replace(mlp="standard"))
    with pytest.raises(ConversionError, match="model.use_bias=True: LlamaForCausalLM needs use_bias=False"):
        hf_llama.hf_config_from_model(llama.replace(use_bias=True))


def test_report_max_diffs():
    """Prints the differences recorded above (pytest -s shows them), one line per architecture and shape."""
    for name, difference in sorted(MAX_DIFFS.items()):
        print(f"{name}: {difference:.2e}")
