"""train/mfu's two halves: the model-FLOP formulas (hand counts and the models' own matmuls) and the peak
(device table, dtype, CPU calibration and its cache)."""

from __future__ import annotations

import json
import os
import logging
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax.models.families import FAMILIES, build_model
from llm_jax.models.heads import HEADS
from llm_jax.models.model_config import ModelConfig
from llm_jax.training import flops, peak_flops

# ----------------------------------------------------------------------------- formulas: hand counts

TINY = dict(num_layers=1, num_heads=2, head_dim=4, d_model=8, d_ff=32, vocab_size=10)


def test_one_layer_decoder_by_hand():
    cfg = ModelConfig(family="decoder", **TINY)
    seq_len = 3
    q = k = v = o = 8 * 8  # d_model x (heads * head_dim) each, per position
    mlp = 8 * 32 + 32 * 8
    pairs = 1 + 2 + 3  # query i attends keys 0..i
    attention = pairs * (2 * 4 + 2 * 4)  # scores and values: heads * head_dim MACs each per pair
    head = seq_len * 8 * 10
    forward = seq_len * (q + k + v + o + mlp) + attention + head
    assert forward == 2640
    assert sum(flops.forward_macs(cfg, seq_len).values()) == forward
    assert flops.train_flops_per_row(cfg, seq_len) == 6 * forward, "forward 2 + backward 4 FLOPs per MAC"
    assert flops.train_flops_per_token(cfg, seq_len) == 6 * forward / seq_len


def test_causal_attention_is_bidirectional_minus_the_upper_triangle():
    for seq_len in (1, 2, 7, 128):
        decoder = flops.forward_macs(ModelConfig(family="decoder", **TINY), seq_len)
        encoder = flops.forward_macs(ModelConfig(family="encoder", **TINY), seq_len)
        upper_triangle = seq_len * (seq_len - 1) // 2
        assert encoder["attention"] - decoder["attention"] == upper_triangle * 2 * 2 * 4
        assert decoder["projections"] == encoder["projections"] and decoder["mlp"] == encoder["mlp"]
    causal = flops.forward_macs(ModelConfig(family="decoder", **TINY), 4096)["attention"]
    full = flops.forward_macs(ModelConfig(family="encoder", **TINY), 4096)["attention"]
    assert causal / full == pytest.approx(0.5, abs=1e-3)


def test_grouped_query_gated_mlp_and_untied_head_counts():
    cfg = ModelConfig(family="decoder", num_layers=2, num_heads=4, num_kv_heads=1, head_dim=2, d_model=8, d_ff=16,
                      mlp="gated", vocab_size=5, tie_embeddings=False)
    per_position = 8 * 8 + 8 * 2 + 8 * 2 + 8 * 8 + 3 * 8 * 16  # q, k, v (one kv head), o, gate + up + down
    macs = flops.forward_macs(cfg, 4)
    assert macs["projections"] + macs["mlp"] == 2 * 4 * per_position
    assert macs["head"] == 4 * 8 * 5, "an untied head is the same matmul as a tied one"


def test_encoder_heads_pooler_and_prediction_positions_by_hand():
    cfg = ModelConfig(family="encoder", pooler=True, heads=("mlm", "nsp"), **TINY)
    seq_len, predicted = 6, 2
    macs = flops.forward_macs(cfg, seq_len, head_positions=predicted)
    assert macs["pooler"] == 8 * 8
    assert macs["head"] == predicted * (8 * 8 + 8 * 10) + 8 * 2, "MLM transform + vocab at 2 slots, NSP on pooled"
    assert macs["attention"] == seq_len ** 2 * 2 * 2 * 4
    every = flops.forward_macs(cfg, seq_len)
    assert every["head"] == seq_len * (8 * 8 + 8 * 10) + 8 * 2


def test_encoder_decoder_by_hand():
    cfg = ModelConfig(family="decoder", num_layers=99, num_heads=2, num_kv_heads=1, head_dim=4, d_model=8, d_ff=16,
                      vocab_size=10)
    source, target = 2, 3
    per_position = 8 * 8 + 8 * 4 + 8 * 4 + 8 * 8 + 2 * 8 * 16  # q, k, v (one kv head), o, MLP
    encoder = source * per_position + source * source * 2 * 2 * 4
    decoder_self = target * per_position + (1 + 2 + 3) * 2 * 2 * 4
    cross = target * (8 * 8 + 8 * 8) + source * (8 * 4 + 8 * 4) + target * source * 2 * 2 * 4
    head = target * 8 * 10
    macs = flops.encoder_decoder_forward_macs(cfg, encoder_layers=1, decoder_layers=1, source_len=source,
                                              target_len=target)
    assert sum(macs.values()) == encoder + decoder_self + cross + head == 3248
    two_decoder_layers = flops.encoder_decoder_forward_macs(cfg, encoder_layers=1, decoder_layers=2,
                                                            source_len=source, target_len=target)
    assert sum(two_decoder_layers.values()) - sum(macs.values()) == decoder_self + cross, \
        "each decoder layer adds its self-attention block and its cross-attention"
    assert macs["cross_attention"] == target * source * 2 * 2 * 4, "cross-attention is not causal"


def test_every_family_and_head_has_a_formula():
    assert set(FAMILIES.names()) <= set(flops.FAMILY_FLOPS.names()), \
        "a new model family needs its FLOP formula in llm_jax.training.flops.FAMILY_FLOPS (train/mfu)"
    assert set(HEADS.names()) <= set(flops.HEAD_MACS.names()), \
        "a new head needs its FLOP formula in llm_jax.training.flops.HEAD_MACS (train/mfu)"


# ----------------------------------------------------------------------------- formulas: the models' own matmuls


def _dot_macs(jaxpr) -> int:
    """MACs of every dot_general in a jaxpr, nested calls included (a scan's body times its length)."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contracting, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contracting)
        repeat = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if isinstance(inner, jax.extend.core.Jaxpr):
                    total += repeat * _dot_macs(inner)
    return total


def _model_macs(cfg: ModelConfig, seq_len: int, **inputs) -> int:
    model = build_model(cfg)
    tokens = jnp.ones((1, seq_len), jnp.int32)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, **inputs))
    return _dot_macs(jax.make_jaxpr(lambda p: model.apply(p, tokens, **inputs))(params).jaxpr)


@pytest.mark.parametrize("mlp", ["standard", "gated"])
def test_decoder_formula_matches_the_models_matmuls(mlp):
    """The model computes all T^2 scores and masks the upper triangle; the formula counts only what is needed,
    so the two differ by exactly the upper triangle's MACs. Vocabulary 128: no padded rows."""
    cfg = ModelConfig(family="decoder", num_layers=2, num_heads=2, num_kv_heads=1, d_model=16, d_ff=24,
                      vocab_size=128, max_len=16, mlp=mlp)
    seq_len = 7
    upper_triangle = cfg.num_layers * 2 * cfg.num_heads * cfg.head_dim * seq_len * (seq_len - 1) // 2
    assert sum(flops.forward_macs(cfg, seq_len).values()) == _model_macs(cfg, seq_len) - upper_triangle


def test_encoder_formula_matches_the_models_matmuls():
    cfg = ModelConfig(family="encoder", num_layers=2, num_heads=2, d_model=16, d_ff=24, vocab_size=128, max_len=16,
                      pooler=True, type_vocab_size=2, heads=("mlm", "nsp"))
    seq_len, positions = 8, jnp.zeros((1, 3), jnp.int32)
    model = _model_macs(cfg, seq_len, prediction_positions_BP=positions)
    assert sum(flops.forward_macs(cfg, seq_len, head_positions=3).values()) == model


# ----------------------------------------------------------------------------- peaks: device table and dtype


class FakeDevice:
    def __init__(self, kind: str, platform: str = "gpu"):
        self.device_kind, self.platform = kind, platform


@pytest.fixture
def device(monkeypatch):
    monkeypatch.setattr(peak_flops, "_warned", set())

    def use(kind: str, platform: str = "gpu") -> None:
        monkeypatch.setattr(peak_flops, "first_device", lambda: FakeDevice(kind, platform))

    return use


def test_h100_pcie_and_sxm_are_told_apart(device):
    device("NVIDIA H100 PCIe")
    pcie = peak_flops.resolve_peak(None, "bfloat16")
    device("NVIDIA H100 80GB HBM3")
    sxm = peak_flops.resolve_peak(None, "bfloat16")
    assert (pcie.flops_per_device, sxm.flops_per_device) == (756.5e12, 989.4e12)
    assert pcie.source == sxm.source == "table"
    device("TPU v5 lite")
    v5e = peak_flops.resolve_peak(None, "bfloat16").flops_per_device
    device("TPU v5")
    assert (v5e, peak_flops.resolve_peak(None, "bfloat16").flops_per_device) == (197e12, 459e12)


def test_the_peak_follows_the_compute_dtype(device):
    device("NVIDIA A100-SXM4-80GB")
    assert peak_flops.resolve_peak(None, jnp.bfloat16).flops_per_device == 312e12
    assert peak_flops.resolve_peak(None, "float16").flops_per_device == 312e12
    f32 = peak_flops.resolve_peak(None, np.dtype("float32"))
    assert (f32.flops_per_device, f32.dtype) == (156e12, "float32"), "f32 matmuls run as TF32 at JAX's default"
    device("TPU v4", "tpu")
    missing = peak_flops.resolve_peak(None, "float16")
    assert missing.flops_per_device is None and "float16" in missing.note


def test_unknown_kinds_get_no_mfu_and_one_warning(device, caplog):
    device("NVIDIA H100")  # a prefix of real kinds is not one of them
    with caplog.at_level(logging.WARNING):
        first = peak_flops.resolve_peak(None, "bfloat16")
        peak_flops.resolve_peak(None, "bfloat16")
    assert first.flops_per_device is None and first.source is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "'NVIDIA H100'" in warnings[0] and "train.peak_flops_per_device" in warnings[0]


def test_a_configured_peak_wins(device):
    device("NVIDIA H200")
    peak = peak_flops.resolve_peak(123e12, "bfloat16")
    assert (peak.flops_per_device, peak.source) == (123e12, "configured")
    assert flops.mfu_scale(600.0, peak.flops_per_device, 4) == 600.0 / (123e12 * 4)
    assert flops.mfu_scale(600.0, None, 4) is None


# ----------------------------------------------------------------------------- peaks: CPU calibration and its cache


@pytest.fixture
def calibration(monkeypatch, tmp_path, device):
    """Calibration on, a private cache dir, and a fake timer: 0.25 s per 2048^3 product, calls counted."""
    monkeypatch.setenv(peak_flops.CACHE_DIR_ENV, str(tmp_path))
    monkeypatch.setenv(peak_flops.CALIBRATE_ENV, "1")
    device("cpu", "cpu")
    calls = []

    def fake_time(size, dtype, budget_s=peak_flops.CALIBRATION_BUDGET_S):
        calls.append((size, dtype))
        return 0.25

    monkeypatch.setattr(peak_flops, "time_matmul", fake_time)
    return calls


def test_cpu_calibration_is_cached_per_machine_flags_and_dtype(calibration, tmp_path, monkeypatch):
    host = 2 * 2048 ** 3 / 0.25
    first = peak_flops.resolve_peak(None, "float32")
    assert calibration == [(2048, "float32")]
    assert first.source == "calibrated"
    assert first.flops_per_device == pytest.approx(host / jax.local_device_count()), "the host's cores, shared"
    cache = json.loads((tmp_path / peak_flops.CACHE_FILE).read_text())
    (entry,) = cache.values()
    assert entry["flops"] == host and entry["dtype"] == "float32" and entry["cores"] >= 1 and entry["cpu"]
    assert entry["jaxlib"] and "xla_flags" in entry

    assert peak_flops.resolve_peak(None, "float32") == first and len(calibration) == 1, "a hit measures nothing"
    peak_flops.resolve_peak(None, "bfloat16")
    assert calibration[-1] == (2048, "bfloat16"), "another dtype is another measurement"
    flags = os.environ.get("XLA_FLAGS", "")
    monkeypatch.setenv("XLA_FLAGS", f"{flags} --xla_force_host_platform_device_count=3")
    peak_flops.resolve_peak(None, "float32")
    assert len(calibration) == 2, "splitting the CPU into devices (mesh.cpu_devices) keeps the host's peak"
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_some_other_setting=1")
    peak_flops.resolve_peak(None, "float32")
    assert len(calibration) == 3, "other XLA flags measure again"
    assert len(json.loads((tmp_path / peak_flops.CACHE_FILE).read_text())) == 3


def test_a_corrupt_cache_is_measured_again_and_calibration_can_be_off(calibration, tmp_path, monkeypatch):
    (tmp_path / peak_flops.CACHE_FILE).write_text("{not json")
    assert peak_flops.resolve_peak(None, "float32").source == "calibrated" and len(calibration) == 1
    assert json.loads((tmp_path / peak_flops.CACHE_FILE).read_text())
    monkeypatch.setenv(peak_flops.CALIBRATE_ENV, "0")
    off = peak_flops.resolve_peak(None, "bfloat16")
    assert off.flops_per_device is None and peak_flops.CALIBRATE_ENV in off.note and len(calibration) == 1


def test_the_real_calibration_matmul_is_quick_and_plausible():
    start = time.perf_counter()
    measured = peak_flops.measure_matmul_flops(512, "float32")
    assert time.perf_counter() - start < 3.0
    assert 1e8 < measured < 1e14, f"{measured:.3g} FLOP/s for a 512^3 f32 matmul on this CPU"
