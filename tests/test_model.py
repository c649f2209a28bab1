"""The decoder against an independent reference written from the checkpoint spec."""

import math

import pytest
import torch

from mobilemoe.config import preset
from mobilemoe.model import MobileMoEForCausalLM, apply_rope, rope_inv_freq

from reference_impl import spec_forward, spec_rope


@pytest.mark.parametrize("name, overrides", [
    ("tiny-moe", {}),
    ("tiny-dense", {}),
    ("tiny-moe-softmax", {}),
    ("tiny-moe", {"interleave_moe_layer_step": 2, "no_rope_layers": [1, 1, 1, 0]}),
    ("tiny-moe", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 64,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0}}),
])
def test_forward_matches_spec_reference(name, overrides):
    model = MobileMoEForCausalLM(preset(name, **overrides)).eval()
    with torch.no_grad():
        model.model.layers[0].feed_forward.expert_bias.normal_(0, 0.01) if model.model.layers[0].is_moe else None
        ids = torch.randint(0, model.config.vocab_size, (1, 13))
        ours = model(ids).logits
        ref = spec_forward(model, ids)
    assert torch.allclose(ours, ref, atol=2e-5, rtol=1e-4), (ours - ref).abs().max()


def test_apply_rope_rotates_adjacent_pairs():
    cfg = preset("tiny-moe")
    inv_freq = rope_inv_freq(cfg)
    x = torch.randn(1, 2, 5, cfg.head_dim)
    angles = torch.arange(5.0)[:, None] * inv_freq[None]
    ours = apply_rope(x, angles.cos(), angles.sin())
    assert torch.allclose(ours, spec_rope(x, torch.arange(5), inv_freq), atol=1e-6)
    # Pair (0, 1) at position 1 rotates by inv_freq[0] = 1 radian.
    e = torch.zeros(1, 1, 1, cfg.head_dim)
    e[..., 0] = 1.0
    out = apply_rope(e, torch.cos(inv_freq)[None], torch.sin(inv_freq)[None])
    assert torch.allclose(out[0, 0, 0, :2], torch.tensor([math.cos(1.0), math.sin(1.0)]))


def test_llama3_degenerate_scaling_keeps_short_wavelengths():
    cfg = preset("mobilemoe-s")
    base = cfg.rope_theta ** (-torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    scaled = rope_inv_freq(cfg).double()
    short = 2 * math.pi / base < 8192
    assert torch.allclose(scaled[short], base[short].float().double())
    assert torch.allclose(scaled[~short], (base[~short] / 16).float().double())
    assert short.any() and (~short).any()


@pytest.mark.parametrize("name", ["tiny-moe", "tiny-dense", "tiny-moe-softmax"])
def test_kv_cache_incremental_decode_equals_full_forward(name):
    model = MobileMoEForCausalLM(preset(name)).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 20))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(batch=2, max_len=32)
        pieces = [model(ids[:, :7], 0, cache).logits, model(ids[:, 7:12], 7, cache).logits]
        pieces += [model(ids[:, t:t + 1], t, cache).logits for t in range(12, 20)]
    assert cache.length == 20
    assert torch.allclose(torch.cat(pieces, 1), full, atol=1e-5)


def test_return_router_and_last_only():
    model = MobileMoEForCausalLM(preset("tiny-moe", interleave_moe_layer_step=2))
    ids = torch.randint(0, 512, (2, 6))
    out = model(ids, return_router=True, last_only=True)
    assert out.logits.shape == (2, 1, 512)
    assert out.moe_layers == [1, 3]
    assert out.router[0].expert_ids.shape == (12, 4) and out.router[0].logits.shape == (12, 16)
    assert model(ids).router == []


def test_bf16_forward_and_position_limit():
    model = MobileMoEForCausalLM(preset("tiny-moe")).to(torch.bfloat16)
    assert model(torch.randint(0, 512, (1, 8))).logits.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 513, dtype=torch.long))


def test_seeded_init_is_deterministic():
    a, b = MobileMoEForCausalLM(preset("tiny-moe")), MobileMoEForCausalLM(preset("tiny-moe"))
    a.reset_parameters(seed=3)
    b.reset_parameters(seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
