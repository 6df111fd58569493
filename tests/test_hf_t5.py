"""Hugging Face T5 import/export: the encoder-decoder computes the logits transformers computes on randomly
initialised T5s of several shapes (v1.0 relu tied, v1.1 gated-gelu untied, d_kv != d_model/num_heads, fewer or
more decoder layers, other bucket settings, both layer layouts); import -> llm_jax.load -> export ->
transformers' from_pretrained loads with no missing or unexpected keys and gives the same logits; greedy
decoding by our engine picks transformers' tokens; bad configs and models fail naming the entry or key."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import import_or_fail
from llm_jax.interop import architectures, hf_t5
from llm_jax.interop.hf_common import ConversionError
from llm_jax.models.families import build_model
from llm_jax.models.model_config import make_model_config
from test_hf_decoders import SPM_1000, TOLERANCE, numpy_state_dict, random_model, token_ids

pytestmark = pytest.mark.slow  # run with --slow (README); the default suite stays under 15 min

transformers = import_or_fail("transformers")
torch = import_or_fail("torch")

COMMON = dict(dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
# name -> (T5Config entries, scan_layers of the converter-level check)
SHAPES = {
    "v1.0 relu tied d32 h4 kv8 L2+2 V1100": (dict(
        vocab_size=1100, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, feed_forward_proj="relu"), False),
    "v1.1 gated-gelu untied d32 h4 kv12 L2+3 V1128": (dict(
        vocab_size=1128, d_model=32, d_kv=12, d_ff=40, num_layers=2, num_decoder_layers=3, num_heads=4,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, layer_norm_epsilon=1e-5), True),
    "relu tied d24 h3 kv6 L3+1 buckets8 dist16 V1100": (dict(
        vocab_size=1100, d_model=24, d_kv=6, d_ff=32, num_layers=3, num_decoder_layers=1, num_heads=3,
        relative_attention_num_buckets=8, relative_attention_max_distance=16), True),
}
FOLDER_SHAPES = list(SHAPES)[:2]  # imported as folders (the import, llm_jax.load, export and generation tests)
ENCODER_LEN, DECODER_LEN = 24, 9  # past the 16-distance buckets of the third shape
MAX_DIFFS: dict[str, float] = {}


def random_t5(name: str, seed: int = 0):
    """A perturbed T5; with tie_word_embeddings=False also an lm_head of its own (transformers 5.x ties it to
    `shared` whatever the config says, but loads a saved lm_head that differs untied: a released v1.1)."""
    model = random_model(transformers.T5ForConditionalGeneration, transformers.T5Config, seed,
                         **COMMON, **SHAPES[name][0])
    if SHAPES[name][0].get("tie_word_embeddings") is False:
        model.lm_head.weight = torch.nn.Parameter(model.shared.weight.detach() + 0.1 * torch.randn_like(
            model.shared.weight))
    return model


def save_folder(model, directory: str) -> str:
    """save_pretrained, plus lm_head.weight when it is not `shared` (transformers leaves it out as tied)."""
    from safetensors.torch import load_file, save_file

    model.save_pretrained(directory)
    if model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr():
        path = os.path.join(directory, "model.safetensors")
        tensors = load_file(path)
        tensors.setdefault("lm_head.weight", model.lm_head.weight.detach().clone())
        save_file(tensors, path, metadata={"format": "pt"})
    return directory


def inputs(vocab: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    decoder_ids = token_ids(vocab, 2, DECODER_LEN, seed + 1)
    decoder_ids[:, 0] = 0  # the decoder start id
    return token_ids(vocab, 2, ENCODER_LEN, seed), decoder_ids


def torch_logits(model, ids_BS: np.ndarray, decoder_ids_BT: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids_BS, dtype=torch.long),
                     decoder_input_ids=torch.tensor(decoder_ids_BT, dtype=torch.long)).logits.numpy()


def record(name: str, difference: float) -> float:
    MAX_DIFFS[name] = difference
    print(f"\n[{name}] logits max abs diff vs transformers: {difference:.2e}")
    return difference


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """name -> (transformers model, workdir of its import, llm_jax.load of it), each imported once."""
    import llm_jax
    from llm_jax.convert import import_hf

    cache = {}

    def get(name: str):
        if name not in cache:
            model, root = random_t5(name), tmp_path_factory.mktemp("t5")
            import_hf(save_folder(model, str(root / "hf")), str(root / "run"), tokenizer_path=SPM_1000)
            cache[name] = (model, str(root / "run"), llm_jax.load(str(root / "run")))
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(SHAPES))
def test_logits_equal_transformers(name, imported):
    """The folder import through llm_jax.load (the first two shapes), and the converter alone in the layer
    layout of the shape (scan_layers)."""
    config, scan_layers = SHAPES[name]
    folder = name in FOLDER_SHAPES
    model = imported(name)[0] if folder else random_t5(name)
    ids_BS, decoder_ids_BT = inputs(model.config.vocab_size)
    theirs = torch_logits(model, ids_BS, decoder_ids_BT)
    if folder:
        cfg = imported(name)[2].model_config
        ours = imported(name)[2].logits(ids_BS, decoder_ids_BT)
        assert record(f"{name} folder -> llm_jax.load", float(np.abs(ours - theirs).max())) <= TOLERANCE
        assert (cfg.tie_embeddings, cfg.scale_decoder_outputs) == ((config.get("tie_word_embeddings", True),) * 2)
    cfg = make_model_config(**hf_t5.model_config_from_hf(model.config.to_dict())).replace(
        scan_layers=scan_layers, tie_embeddings=config.get("tie_word_embeddings", True))
    params = hf_t5.hf_to_params(numpy_state_dict(model), cfg)
    logits = build_model(cfg).apply({"params": params}, jnp.asarray(ids_BS), jnp.asarray(decoder_ids_BT)).heads["lm"]
    layout = "scanned" if scan_layers else "looped"
    difference = float(np.abs(np.asarray(logits)[..., :cfg.vocab_size] - theirs).max())
    assert record(f"{name} {layout} converter", difference) <= TOLERANCE


@pytest.mark.parametrize("name", FOLDER_SHAPES)
def test_import_export_round_trip(name, imported, tmp_path):
    from llm_jax.convert import export_hf

    model, workdir, loaded = imported(name)
    export_hf(workdir, str(tmp_path / "out"))
    reloaded, info = transformers.T5ForConditionalGeneration.from_pretrained(str(tmp_path / "out"),
                                                                           output_loading_info=True)
    assert not any(info[kind] for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ids_BS, decoder_ids_BT = inputs(model.config.vocab_size, seed=5)
    difference = float(np.abs(torch_logits(reloaded.eval(), ids_BS, decoder_ids_BT)
                              - torch_logits(model, ids_BS, decoder_ids_BT)).max())
    assert record(f"{name} import -> export -> transformers", difference) <= TOLERANCE
    with open(tmp_path / "out" / "config.json") as f:
        saved = json.load(f)
    tied = loaded.model_config.tie_embeddings
    assert (saved["tie_word_embeddings"], saved["scale_decoder_outputs"], saved["decoder_start_token_id"]) == (
        tied, tied, 0)
    assert reloaded.config.scale_decoder_outputs is tied


@pytest.mark.parametrize("name", FOLDER_SHAPES[1:])  # untied, more decoder than encoder layers (time: one)
def test_greedy_generation_equals_transformers(name, imported):
    from llm_jax.decoding.engine import DecodeOptions, build_engine

    model, _, loaded = imported(name)
    prompts = token_ids(model.config.vocab_size, 2, 7, seed=7)
    engine = build_engine(loaded.model_config, eos_id=None, pad_id=0)  # T5's decoder_start_token_id
    ours = engine.generate(loaded.params, prompts.tolist(), DecodeOptions(max_new_tokens=5, temperature=0.0))
    model.generation_config.eos_token_id = None  # five tokens whatever they are, as ours
    with torch.no_grad():
        # use_cache=False: transformers' cache has num_layers (encoder) entries, too few for more decoder layers
        theirs = model.generate(torch.tensor(prompts, dtype=torch.long), max_new_tokens=5, do_sample=False,
                                use_cache=False)
    assert ours == theirs[:, 1:].tolist()  # without the start token


# ----------------------------------------------------------------------------- configs and bad input


def _config(**changes) -> dict:
    return {**transformers.T5Config(**COMMON, **SHAPES["v1.0 relu tied d32 h4 kv8 L2+2 V1100"][0]).to_dict(),
            **changes}


def test_config_keys_map_to_model_keys(caplog):
    cfg = make_model_config(**hf_t5.model_config_from_hf(_config(feed_forward_proj="gated-gelu", d_kv=5,
                                                                   num_decoder_layers=4, layer_norm_epsilon=1e-5)))
    assert (cfg.family, cfg.positional, cfg.norm, cfg.mlp, cfg.activation, cfg.use_bias) == (
        "encoder_decoder", "t5_relative_bias", "rmsnorm", "gated", "gelu_tanh", False)
    assert (cfg.head_dim, cfg.num_layers, cfg.num_decoder_layers, cfg.norm_eps, cfg.scale_attention_logits) == (
        5, 2, 4, 1e-5, False)
    # transformers 5.x: an explicit scale_decoder_outputs wins, else tie_word_embeddings is not False
    for entries, scale in (({"tie_word_embeddings": False}, False), ({}, True),
                           ({"tie_word_embeddings": True, "scale_decoder_outputs": False}, False)):
        config = {key: value for key, value in _config(**entries).items() if key != "scale_decoder_outputs"
                  or "scale_decoder_outputs" in entries}
        assert hf_t5.model_config_from_hf(config)["scale_decoder_outputs"] is scale, entries
        assert hf_t5.model_config_from_hf(config)["tie_embeddings"] is True  # no lm_head tensor: tied


@pytest.mark.parametrize("changes, message", [
    (dict(feed_forward_proj="gated-silu"), "feed_forward_proj='gated-silu' is not supported; one of relu, gated-gelu"),
    (dict(model_type="mt5"), "model_type='mt5' is not supported"),
])
def test_unsupported_configs_name_the_entry(changes, message):
    with pytest.raises(ConversionError, match=message):
        hf_t5.model_config_from_hf(_config(**changes), source="config.json")


def _t5_model(**changes):
    fields = hf_t5.model_config_from_hf(_config())
    return make_model_config(**{**fields, **changes})


@pytest.mark.parametrize("changes, message", [
    (dict(use_bias=True), "model.use_bias=True: T5ForConditionalGeneration needs use_bias=False"),
    (dict(norm="layernorm"), "model.norm='layernorm'"),
    (dict(scale_attention_logits=True), "model.scale_attention_logits=True"),
    (dict(num_kv_heads=2), "model.num_kv_heads=2: T5 has no grouped-query attention"),
    (dict(mlp="swiglu"), "model.mlp='swiglu' with model.activation='silu'"),
    (dict(mlp="gated", activation="gelu"), "model.mlp='gated' with model.activation='gelu'"),
])
def test_export_names_the_key_t5_cannot_express(changes, message):
    with pytest.raises(ConversionError, match=message):
        hf_t5.hf_config_from_model(_t5_model(**changes))


def test_export_of_a_sinusoidal_encoder_decoder_names_the_key():
    cfg = _t5_model(positional="sinusoidal")
    with pytest.raises(ConversionError, match="model.family='encoder_decoder', model.positional='sinusoidal'"):
        architectures.for_model(cfg)
    with pytest.raises(ConversionError, match="model.positional='sinusoidal': T5ForConditionalGeneration needs"):
        hf_t5.params_to_hf({}, cfg)


def test_missing_tokenizer_says_what_to_pass(tmp_path):
    from llm_jax.convert import import_hf

    src = tmp_path / "hf"
    save_folder(random_t5("v1.0 relu tied d32 h4 kv8 L2+2 V1100"), str(src))
    with pytest.raises(ConversionError, match="no spiece.model; pass --tokenizer_path"):
        import_hf(str(src), str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")


def test_a_saved_lm_head_is_tied_only_when_it_equals_shared(tmp_path):
    """transformers 5.x ties lm_head to `shared` unless the checkpoint's lm_head differs (then untied)."""
    from safetensors.numpy import load_file, save_file

    from llm_jax.convert import _read_source

    src = save_folder(random_t5("v1.0 relu tied d32 h4 kv8 L2+2 V1100"), str(tmp_path / "hf"))
    path = os.path.join(src, "model.safetensors")
    tensors = load_file(path)
    for lm_head, tied in ((tensors["shared.weight"], True), (tensors["shared.weight"] + 1.0, False)):
        save_file({**tensors, "lm_head.weight": lm_head}, path)
        assert _read_source(src, 128)[3].tie_embeddings is tied
