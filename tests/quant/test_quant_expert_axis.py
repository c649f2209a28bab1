"""Routed experts grouped along `in` (config expert_quant_group_axis "in"): quantize / dequantize /
QAT / convert / save / load all follow the one rule, and the checkpoint records the axis."""

import json

import pytest
import torch
from quant_helpers import tiny_model, token_ids

from mobilemoe.accounting import weight_bytes
from mobilemoe.checkpoint import CheckpointError, load_model, load_tensors, save_tensors
from mobilemoe.formats import EXPERT_GROUP_AXIS_TEXT, int4_shapes, unpack_int4
from mobilemoe.quant import (
    dequantize,
    fake_quantize,
    fake_quantize_ste,
    prepare_qat,
    qat_weights,
    quantize,
    quantize_state_dict,
    remove_qat,
)

GU = "model.layers.0.feed_forward.experts.gate_up"
DN = "model.layers.0.feed_forward.experts.down"


def _known_in(E, n_in, n_out, seed):
    """[E, in, out] weights that quantize exactly along `in`: (w, codes [E, out, in], scales [E, out, in/32])."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-7, 8, (E, n_out, n_in // 32, 32), generator=g, dtype=torch.int8)
    codes[..., 5] = -8  # each group's extreme -> its scale exactly
    scales = (torch.randint(1, 64, (E, n_out, n_in // 32), generator=g).float() / 1024).to(torch.float16)
    w = (codes.float() * scales.float().unsqueeze(-1)).flatten(-2).transpose(1, 2).contiguous()
    return w, codes.flatten(-2), scales


def test_quantize_along_in_round_trip():
    w, codes, scales = _known_in(3, 64, 96, seed=0)
    packed, s = quantize(w, group_dim=-2)
    assert packed.shape == (3, 96, 32) and s.shape == (3, 96, 2)  # stored [E, out, in/2] / [E, out, in/32]
    assert (packed.shape, s.shape) == int4_shapes((3, 64, 96), group_dim=-2)
    assert torch.equal(unpack_int4(packed), codes) and torch.equal(s, scales)
    assert torch.equal(dequantize(packed, s, group_dim=-2), w)  # back in the logical [E, in, out]
    # the one rule, reused: the same as quantizing the transposed tensor along its last axis
    r = torch.randn(2, 64, 96)
    pt, st = quantize(r.transpose(1, 2).contiguous())
    p2, s2 = quantize(r, group_dim=-2)
    assert torch.equal(pt, p2) and torch.equal(st, s2)
    assert torch.equal(fake_quantize(r, group_dim=-2), dequantize(p2, s2, group_dim=-2))
    assert not torch.equal(fake_quantize(r, group_dim=-2), fake_quantize(r))  # the axes really differ


def test_qat_fake_quant_along_in_equals_quantize_dequantize():
    w = torch.randn(4, 64, 128, requires_grad=True)
    q = fake_quantize_ste(w, 32, -2)
    packed, s = quantize(w.detach(), group_dim=-2)
    assert torch.equal(q.detach(), dequantize(packed, s, group_dim=-2))
    q.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))  # straight-through


def test_in_axis_qat_model_converts_saves_and_loads_exactly(tmp_path):
    model = tiny_model(seed=3, expert_quant_group_axis="in").eval()
    prepare_qat(model)
    experts = model.model.layers[0].feed_forward.experts
    assert experts.qat_group_dim == -2
    gu, dn = experts.expert_weights()
    assert torch.equal(gu, fake_quantize(experts.gate_up_proj, group_dim=-2))
    assert torch.equal(dn, fake_quantize(experts.down_proj, group_dim=-2))
    ids = token_ids()
    with torch.no_grad():
        want = model(ids).logits
    fq = qat_weights(model)
    cfg, t = quantize_state_dict(model.config, model.state_dict())
    assert cfg.quantization["expert_group_axis"] == EXPERT_GROUP_AXIS_TEXT["in"]
    E, H, I = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
    assert t[f"{GU}_qweight"].shape == (E, 2 * I, H // 2) and t[f"{GU}_scale"].shape == (E, 2 * I, H // 32)
    assert t[f"{DN}_qweight"].shape == (E, H, I // 2) and t[f"{DN}_scale"].shape == (E, H, I // 32)
    assert torch.equal(dequantize(t[f"{GU}_qweight"], t[f"{GU}_scale"], group_dim=-2), fq[f"{GU}_proj"])
    save_tensors(t, cfg, tmp_path / "ck")
    raw = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert raw["quantization"]["expert_group_axis"] == EXPERT_GROUP_AXIS_TEXT["in"]
    assert raw["expert_quant_group_axis"] == "in"
    cfg2, t2 = load_tensors(tmp_path / "ck")
    assert cfg2.expert_quant_group_axis == "in" and all(torch.equal(t[k], t2[k]) for k in t)
    loaded = load_model(tmp_path / "ck").eval()
    assert loaded.config.expert_quant_group_axis == "in" and not loaded.config.is_quantized
    for name, value in fq.items():
        assert torch.equal(loaded.state_dict()[name], value), name
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, want)  # the INT4 checkpoint computes the QAT forward
    remove_qat(model)
    assert "qat_group_dim" not in experts.__dict__


def test_in_axis_checkpoint_is_never_read_as_out(tmp_path):
    """Strip the recorded axis from an `in` checkpoint's config.json: it now claims the released
    `out` layout, and loading refuses it (the down experts' shapes differ) instead of misreading it."""
    model = tiny_model(seed=1, expert_quant_group_axis="in")
    cfg, t = quantize_state_dict(model.config, model.state_dict())
    save_tensors(t, cfg, tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["quantization"].pop("expert_group_axis")
    raw.pop("expert_quant_group_axis")
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_tensors(tmp_path)


def test_in_axis_changes_no_byte_count(tmp_path):
    """accounting's INT4 bytes are the same for both axes and equal the tensors actually written."""
    sizes = {}
    for axis in ("out", "in"):
        model = tiny_model(seed=0, expert_quant_group_axis=axis)
        cfg, t = quantize_state_dict(model.config, model.state_dict())
        sizes[axis] = sum(v.numel() * v.element_size() for v in t.values())
        assert weight_bytes(cfg, "int4") == sizes[axis]
    assert sizes["in"] == sizes["out"]
