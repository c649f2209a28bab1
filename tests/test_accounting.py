import pytest

from mobilemoe import accounting as acc
from mobilemoe.config import preset
from mobilemoe.model import MobileMoEForCausalLM


@pytest.mark.parametrize("name, overrides", [
    ("tiny-moe", {}), ("tiny-dense", {}), ("tiny-moe-softmax", {}),
    ("tiny-moe", {"interleave_moe_layer_step": 2, "attention_bias": True}),
    ("tiny-moe", {"tie_word_embeddings": False, "num_shared_experts": 0}),
])
def test_total_params_equal_model_parameters(name, overrides):
    cfg = preset(name, **overrides)
    model = MobileMoEForCausalLM(cfg)
    assert acc.total_params(cfg) == sum(p.numel() for p in model.parameters())
    state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    from mobilemoe.layout import tensor_specs
    assert state == {s.name: s.shape for s in tensor_specs(cfg)}


def test_active_params_by_hand_for_tiny_moe():
    cfg = preset("tiny-moe")
    H, I, E, k, S, L = 128, 64, 16, 4, 128, 4
    attn = H * (4 * 32) + 2 * H * (2 * 32) + (4 * 32) * H
    per_layer = attn + 2 * H + E * H + E + 3 * H * S + k * 3 * H * I
    assert acc.active_params(cfg) == pytest.approx(L * per_layer + 512 * H + H)


def test_published_s_and_l_figures():
    s, l_ = acc.account(preset("mobilemoe-s")), acc.account(preset("mobilemoe-l"))
    assert s.active_params == pytest.approx(272e6, rel=0.02)
    assert 1.26e9 <= s.total_params <= 1.3e9
    assert l_.active_params == pytest.approx(922e6, rel=0.02)
    assert l_.total_params == pytest.approx(5.3e9, rel=0.02)
    gib = 1024**3
    assert s.int4_bytes / gib == pytest.approx(0.68, rel=0.03)
    assert l_.int4_bytes / gib == pytest.approx(2.75, rel=0.03)
    # The released S file is 713,916,240 bytes; the rest is the safetensors JSON header.
    assert 0 < 713_916_240 - s.int4_bytes < 100_000


def test_dense_baseline_and_m_tier():
    dense = acc.account(preset("mobilellm-pro-like"))
    assert dense.total_params == pytest.approx(1.08e9, rel=0.01)
    assert dense.active_params == dense.total_params
    m = acc.account(preset("mobilemoe-m"))
    assert m.int4_bytes / 1024**3 == pytest.approx(1.48, rel=0.02)


def test_flops_and_kv_bytes():
    cfg = preset("mobilemoe-s")
    matmul = acc.matmul_params_per_token(cfg)
    assert acc.decode_flops_per_token(cfg, 0) == 2 * matmul
    per_pos = 4 * 20 * 12 * 64
    assert acc.decode_flops_per_token(cfg, 1000) - acc.decode_flops_per_token(cfg, 0) == per_pos * 1000
    assert acc.prefill_flops(cfg, 1) == acc.decode_flops_per_token(cfg, 1)
    assert acc.kv_cache_bytes(cfg, 8192) == 2 * 20 * 4 * 64 * 8192 * 2
    # The decode roofline reads ~153 MB per token for S (spec), and 0.61 GB for the dense model.
    assert acc.decode_weight_bytes_per_token(cfg) == pytest.approx(153e6, rel=0.03)
    assert acc.decode_weight_bytes_per_token(preset("mobilellm-pro-like")) == pytest.approx(0.61e9, rel=0.01)
