"""Conformance: every registered component (positional encodings, norms and their position, MLPs) passes the
same checks, with no list of names here: a new component file joins
automatically. Checks: output shapes; every parameter carries logical axis names; the forward pass is
deterministic; causal stacks do not read the future; a 2x2x2 mesh (data, fsdp, tensor) gives the one-device
outputs; and a model rebuilt from its saved config (component keys included) with its saved parameters
resumes with identical outputs."""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from conftest import needs
from llm_jax import config as config_lib
from llm_jax.models.blocks import NORM_POSITIONS
from llm_jax.models.families import FAMILIES, build_model
from llm_jax.models.mlp import MLPS
from llm_jax.models.model_config import (make_model_config, model_config_from_json, model_config_to_json)
from llm_jax.models.norms import NORMS
from llm_jax.models.positions import POSITIONALS
from llm_jax.sharding import logical_rules

pytestmark = pytest.mark.slow  # run with --slow (README); the default suite stays under 15 min

VOCAB, LEN, DEC_LEN = 31, 12, 7
BASE = dict(vocab_size=VOCAB, padded_vocab_size=64, num_layers=2, num_heads=4, num_kv_heads=2, d_model=32,
            max_len=16, use_bias=True)  # padded: the embedding splits over tensor x fsdp
FAMILY_HEADS = {"decoder": ("lm",), "encoder": ("mlm",), "encoder_decoder": ("lm",)}


def components():
    """(family, key, name): every registered positional encoding in every family (stacks differ in how they
    take positions: causal or not, shared embedding, cross-attention), and every norm, norm position and MLP in
    the decoder and the encoder-decoder (one Block serves every family)."""
    keys = {"norm": NORMS, "norm_position": NORM_POSITIONS, "mlp": MLPS}
    return ([(family, "positional", name) for family in FAMILIES.names() for name in POSITIONALS.names()] +
            [(family, key, name) for family in ("decoder", "encoder_decoder") for key, registry in keys.items()
             for name in registry.names()])


def inputs(family, tokens_BT):
    if family == "encoder_decoder":
        return (tokens_BT, tokens_BT[:, :DEC_LEN])
    return (tokens_BT,)


def build(family, key, name):
    cfg = make_model_config(**BASE, family=family, heads=FAMILY_HEADS[family], **{key: name})
    model = build_model(cfg)
    tokens_BT = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (2, LEN)), jnp.int32)
    boxed = model.init(jax.random.key(0), *inputs(family, tokens_BT))["params"]
    return cfg, model, boxed, tokens_BT


def logits(model, params, family, tokens_BT):
    outputs = model.apply({"params": params}, *inputs(family, tokens_BT))
    return outputs.heads[FAMILY_HEADS[model.config.family][0]]


@pytest.mark.parametrize("family, key, name", components(), ids=lambda v: str(v))
def test_component_conformance(family, key, name, tmp_path):
    cfg, model, boxed, tokens_BT = build(family, key, name)
    unnamed = [jax.tree_util.keystr(path) for path, leaf in
               jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
               if not isinstance(leaf, nn.Partitioned)]
    assert not unnamed, f"parameters without logical axis names (no sharding rule applies): {unnamed}"
    params = nn.unbox(boxed)
    out = logits(model, params, family, tokens_BT)
    positions = DEC_LEN if family == "encoder_decoder" else LEN
    assert out.shape[:2] == (2, positions) and out.shape[-1] >= VOCAB
    np.testing.assert_array_equal(out, logits(model, params, family, tokens_BT))  # deterministic
    assert np.all(np.isfinite(np.asarray(out[..., :VOCAB])))
    if family != "encoder":  # causal (the decoder side of an encoder-decoder): position t never reads t+1..
        cut = 4
        changed_BT = tokens_BT.at[:, cut + 1:].set((tokens_BT[:, cut + 1:] + 1) % VOCAB)
        if family == "encoder_decoder":  # change only the decoder's future, keep the encoder input
            other = model.apply({"params": params}, tokens_BT, changed_BT[:, :DEC_LEN]).heads["lm"]
        else:
            other = logits(model, params, family, changed_BT)
        np.testing.assert_allclose(other[:, :cut + 1], out[:, :cut + 1], atol=1e-5)
        assert not np.allclose(other[:, cut + 1:], out[:, cut + 1:], atol=1e-5)
    # resume: the saved model config (component keys included) and saved parameters give the same outputs
    saved = json.loads(json.dumps(model_config_to_json(cfg)))
    np.savez(tmp_path / "params.npz", *jax.tree.leaves(params))
    with np.load(tmp_path / "params.npz") as restored:
        leaves = [restored[f"arr_{i}"] for i in range(len(restored.files))]
    rebuilt = model_config_from_json(saved)
    assert rebuilt == cfg
    again = logits(build_model(rebuilt), jax.tree.unflatten(jax.tree.structure(params), leaves), family, tokens_BT)
    np.testing.assert_array_equal(again, out)


@pytest.mark.parametrize("family, key, name", [("decoder", "positional", name) for name in POSITIONALS.names()] +
                         [(family, "mlp", "swiglu") for family in FAMILIES.names() if family != "decoder"],
                         ids=lambda v: str(v))
def test_component_on_a_2x2x2_mesh_gives_the_one_device_outputs(family, key, name):
    needs(jax.device_count() >= 8, "needs 8 devices (XLA_FLAGS from conftest)")
    cfg, model, boxed, tokens_BT = build(family, key, name)
    params = nn.unbox(boxed)
    reference = logits(model, params, family, tokens_BT)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    rules = logical_rules(config_lib.default_config().mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
        sharded = jax.device_put(params, shardings)
        out = jax.jit(lambda p, x: logits(model, p, family, x))(sharded, tokens_BT)
    assert any(len(leaf.sharding.device_set) == 8 and not leaf.sharding.is_fully_replicated
               for leaf in jax.tree.leaves(sharded)), "no parameter is split over the mesh"
    np.testing.assert_allclose(out, reference, atol=2e-5)
