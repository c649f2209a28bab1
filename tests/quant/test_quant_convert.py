"""Float -> INT4 conversion: the released checkpoint layout, the expert-axis trap, wrong formats."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from quant_helpers import tiny_cfg, tiny_model
from mobilemoe.checkpoint import expected_tensors, load_model, save_checkpoint, save_tensors
from mobilemoe.config import INT4_QUANTIZATION_BLOCK, preset
from mobilemoe.errors import MobileMoEError
from mobilemoe.model import MobileMoEForCausalLM
from mobilemoe.quant import (
    int4_config,
    quantize,
    quantize_checkpoint,
    quantize_state_dict,
    unpack_int4,
)
from mobilemoe.quant.qat import qat_weights

FMT = INT4_QUANTIZATION_BLOCK["format"]


def _read(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _spec_table(cfg) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """The tensor table of shared/specs/mobilemoe-checkpoint.md, written out by hand."""
    H, V, E, I, S = cfg.hidden_size, cfg.vocab_size, cfg.num_local_experts, cfg.intermediate_size, \
        cfg.intermediate_size_mlp
    q_out, kv_out = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    u8, f16, f32, bf16 = torch.uint8, torch.float16, torch.float32, torch.bfloat16
    t = {"model.embed_tokens.qweight": (u8, (V, H // 2)), "model.embed_tokens.weight_scale": (f16, (V, H // 32)),
         "model.norm.weight": (bf16, (H,))}

    def lin(name, out, inp):
        t[f"{name}.qweight"] = (u8, (out, inp // 2))
        t[f"{name}.weight_scale"] = (f16, (out, inp // 32))

    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}"
        t[f"{p}.input_layernorm.weight"] = (bf16, (H,))
        t[f"{p}.post_attention_layernorm.weight"] = (bf16, (H,))
        for proj, out, inp in (("q", q_out, H), ("k", kv_out, H), ("v", kv_out, H), ("o", H, q_out)):
            lin(f"{p}.self_attn.{proj}_proj", out, inp)
        ff = f"{p}.feed_forward"
        t[f"{ff}.router.weight"] = (f32, (E, H))
        t[f"{ff}.expert_bias"] = (bf16, (E,))
        t[f"{ff}.experts.gate_up_qweight"] = (u8, (E, H, 2 * I // 2))
        t[f"{ff}.experts.gate_up_scale"] = (f16, (E, H, 2 * I // 32))
        t[f"{ff}.experts.down_qweight"] = (u8, (E, I, H // 2))
        t[f"{ff}.experts.down_scale"] = (f16, (E, I, H // 32))
        for proj, out, inp in (("gate", S, H), ("up", S, H), ("down", H, S)):
            lin(f"{ff}.shared_expert.{proj}_proj", out, inp)
    return t


def test_quantized_tiny_model_matches_spec_table(tmp_path):
    model = tiny_model()
    cfg = model.config
    qcfg, tensors = quantize_state_dict(cfg, model.state_dict())
    save_tensors(tensors, qcfg, tmp_path)
    on_disk = _read(tmp_path / "model.safetensors")
    table = _spec_table(cfg)
    assert len(on_disk) == 3 + 22 * cfg.num_hidden_layers == len(table)
    assert set(on_disk) == set(table)
    for name, (dtype, shape) in table.items():
        assert on_disk[name].dtype == dtype, name
        assert tuple(on_disk[name].shape) == shape, name
    assert "lm_head.qweight" not in on_disk and "model.layers.0.feed_forward.expert_bias" in on_disk
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["quantization"] == INT4_QUANTIZATION_BLOCK and "quantization_config" not in raw
    assert raw["torch_dtype"] == "bfloat16" and raw["tie_word_embeddings"] is True
    # the router is copied exactly, in fp32
    r = "model.layers.1.feed_forward.router.weight"
    assert torch.equal(on_disk[r], model.state_dict()[r])


@pytest.mark.parametrize("name", ["tiny-moe-softmax", "tiny-dense"])
def test_other_layouts_untied_and_dense(name):
    cfg = preset(name, num_hidden_layers=2)
    model = MobileMoEForCausalLM(cfg)
    qcfg, tensors = quantize_state_dict(cfg, model.state_dict())
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected_tensors(qcfg)
    if not cfg.tie_word_embeddings:
        assert tensors["lm_head.qweight"].dtype == torch.uint8
        assert tensors["lm_head.weight_scale"].dtype == torch.float16


def test_mobilemoe_s_layout_accounts_for_the_released_file():
    """443 tensors, and their data bytes leave a plausible safetensors header in 713,916,240 bytes."""
    qcfg = int4_config(preset("mobilemoe-s"))
    shapes = expected_tensors(qcfg)
    assert len(shapes) == 443

    def nbytes(name, shape):
        n = 1
        for d in shape:
            n *= d
        if name.endswith("qweight"):
            return n
        return n * (4 if name.endswith("router.weight") else 2)

    header = 713_916_240 - sum(nbytes(k, v) for k, v in shapes.items())
    assert 8 * 443 < header < 100_000, header  # ~120 bytes of JSON per tensor


def _known(shape, seed):
    """A weight that quantizes exactly: returns (w, codes, scales), groups along the last axis."""
    g = torch.Generator().manual_seed(seed)
    *lead, n = shape
    codes = torch.randint(-7, 8, (*lead, n // 32, 32), generator=g, dtype=torch.int8)
    codes[..., 0] = -8  # the group's extreme -> scale = extreme / -8 exactly
    scales = (torch.randint(1, 64, (*lead, n // 32), generator=g).float() / 1024).to(torch.float16)
    w = (codes.float() * scales.float().unsqueeze(-1)).flatten(-2)
    return w, codes.flatten(-2), scales


def test_expert_group_axis_is_out_when_hidden_is_twice_intermediate(tmp_path):
    """The spec's trap: with H = 2I, gate_up [E, H, 2I] is square, so [E, in, out] and a wrong
    [E, out, in] reading give the same packed shape. Codes and scales must follow `out`."""
    cfg = tiny_cfg(hidden_size=64, intermediate_size=32, intermediate_size_mlp=64, num_attention_heads=2,
                   num_key_value_heads=1, head_dim=32)
    assert cfg.hidden_size == 2 * cfg.intermediate_size
    model = MobileMoEForCausalLM(cfg)
    experts = model.model.layers[0].feed_forward.experts
    E, H, I = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
    gu, gu_codes, gu_scales = _known((E, H, 2 * I), seed=3)
    dn, dn_codes, dn_scales = _known((E, I, H), seed=4)
    qp, qp_codes, qp_scales = _known(tuple(model.model.layers[0].self_attn.q_proj.weight.shape), seed=5)
    with torch.no_grad():
        experts.gate_up_proj.copy_(gu)
        experts.down_proj.copy_(dn)
        model.model.layers[0].self_attn.q_proj.weight.copy_(qp)
    qcfg, t = quantize_state_dict(cfg, model.state_dict())
    p = "model.layers.0.feed_forward.experts"
    assert t[f"{p}.gate_up_qweight"].shape == (E, H, 2 * I // 2) == (E, 2 * I, H // 2)  # the trap
    assert torch.equal(t[f"{p}.gate_up_scale"], gu_scales)  # [E, in, out/32]: one scale per (e, in, group)
    assert torch.equal(unpack_int4(t[f"{p}.gate_up_qweight"]), gu_codes)
    assert torch.equal(t[f"{p}.down_scale"], dn_scales)
    assert torch.equal(unpack_int4(t[f"{p}.down_qweight"]), dn_codes)
    assert torch.equal(t["model.layers.0.self_attn.q_proj.weight_scale"], qp_scales)  # linear: along `in`
    # the wrong reading (grouping along `in` of [E, in, out]) gives the same shapes, different scales
    _, wrong = quantize(gu.transpose(-1, -2).contiguous())
    assert wrong.shape == gu_scales.shape and not torch.equal(wrong, gu_scales)
    # and the checkpoint round-trips into the model exactly, gate = first I columns
    save_tensors(t, qcfg, tmp_path)
    loaded = load_model(tmp_path).model.layers[0].feed_forward.experts
    assert torch.equal(loaded.gate_up_proj, gu) and torch.equal(loaded.down_proj, dn)
    x = torch.randn(3, H)
    gate, up = x @ gu[1, :, :I], x @ gu[1, :, I:]
    torch.testing.assert_close(loaded.expert_forward(1, x), (torch.nn.functional.silu(gate) * up) @ dn[1])


@pytest.fixture(scope="module")
def float_ckpt(tmp_path_factory):
    model = tiny_model(seed=2)
    out = tmp_path_factory.mktemp("float")
    save_checkpoint(model, out)
    return out, model


def test_quantize_checkpoint_matches_state_dict_and_reports(float_ckpt, tmp_path):
    src, model = float_ckpt
    report = quantize_checkpoint(src, tmp_path / "int4")
    _, expected = quantize_state_dict(model.config, model.state_dict())
    got = _read(tmp_path / "int4" / "model.safetensors")
    assert set(got) == set(expected)
    for k in expected:
        assert got[k].dtype == expected[k].dtype and torch.equal(got[k], expected[k]), k
    assert report.bytes_before == (src / "model.safetensors").stat().st_size
    assert report.bytes_after == (tmp_path / "int4" / "model.safetensors").stat().st_size
    assert report.bytes_after < report.bytes_before / 4  # fp32 source; INT4 + scales ~ 0.14x
    assert report.tensors_before == len(model.state_dict()) and report.tensors_after == len(expected)
    assert report.format == FMT


def test_quantize_sharded_bf16_checkpoint(tmp_path):
    model = tiny_model(seed=4)
    save_checkpoint(model, tmp_path / "bf16", dtype=torch.bfloat16, max_shard_bytes=200_000)
    assert (tmp_path / "bf16" / "model.safetensors.index.json").exists()
    report = quantize_checkpoint(tmp_path / "bf16", tmp_path / "int4")
    state = {k: (v if k.endswith("router.weight") else v.to(torch.bfloat16)) for k, v in model.state_dict().items()}
    _, expected = quantize_state_dict(model.config, state)
    got = _read(tmp_path / "int4" / "model.safetensors")
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert report.bytes_before > report.bytes_after


def test_quantized_logits_vs_float(float_ckpt, tmp_path):
    src, model = float_ckpt
    quantize_checkpoint(src, tmp_path / "int4")
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    loaded = load_model(tmp_path / "int4")
    # The exact reference: the float model with every quantized tensor replaced by
    # fake_quantize(w) = dequantize(quantize(w)) (norms stay ones, bf16-exact). The checkpoint
    # must decode to exactly those values, so the logits agree to fp32 rounding.
    deq = MobileMoEForCausalLM(model.config)
    deq.load_state_dict({**model.state_dict(), **qat_weights(model)})
    with torch.no_grad():
        ref = model(ids).logits
        exact = deq(ids).logits
        got = loaded(ids).logits
    torch.testing.assert_close(got, exact, rtol=0, atol=1e-5)
    rel = ((got - ref).norm() / ref.norm()).item()
    top1 = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    # The quantization error itself (a wrong decode is the exact check's job: swapped nibbles permute
    # the hidden axis of the tied embedding and head alike and barely move these numbers). Measured
    # on this seed: relative L2 error 0.173, top-1 agreement 1.000; the bounds leave ~20% for
    # rounding across machines.
    assert rel < 0.21, rel
    assert top1 >= 0.95, top1


# ---------------------------------------------------------------------- wrong formats
def test_int4_checkpoint_rejected_naming_the_format(float_ckpt, tmp_path):
    src, _ = float_ckpt
    quantize_checkpoint(src, tmp_path / "int4")
    with pytest.raises(MobileMoEError, match=f"already an INT4 checkpoint.*{FMT}"):
        quantize_checkpoint(tmp_path / "int4", tmp_path / "again")


def test_float_config_with_int4_tensors_rejected(tmp_path):
    model = tiny_model()
    qcfg, tensors = quantize_state_dict(model.config, model.state_dict())
    (tmp_path / "bad").mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "bad" / "model.safetensors"))
    model.config.to_json(tmp_path / "bad" / "config.json")  # float config, INT4 tensors
    with pytest.raises(MobileMoEError, match=f"packed {FMT} INT4 layout.*already quantized"):
        quantize_checkpoint(tmp_path / "bad", tmp_path / "out")
    with pytest.raises(MobileMoEError, match="already quantized"):
        quantize_state_dict(model.config, tensors)
    with pytest.raises(MobileMoEError, match=f"already quantized.*{FMT}"):
        quantize_state_dict(qcfg, model.state_dict())


def test_state_dict_mismatch_and_bad_dims(tmp_path):
    model = tiny_model()
    state = model.state_dict()
    state.pop("model.norm.weight")
    with pytest.raises(MobileMoEError, match="missing.*model.norm.weight"):
        quantize_state_dict(model.config, state)
    with pytest.raises(MobileMoEError, match="multiple of 32"):
        int4_config(tiny_cfg(hidden_size=80, head_dim=16, num_attention_heads=4, intermediate_size=40,
                             intermediate_size_mlp=80))
    bad = model.state_dict()
    bad["model.layers.0.self_attn.q_proj.weight"][0, 0] = float("nan")
    with pytest.raises(MobileMoEError, match="non-finite"):
        quantize_state_dict(model.config, bad)


def test_output_directory_guards(float_ckpt, tmp_path):
    src, _ = float_ckpt
    with pytest.raises(MobileMoEError, match="is the source"):
        quantize_checkpoint(src, src)
    quantize_checkpoint(src, tmp_path / "o")
    with pytest.raises(MobileMoEError, match="already holds a checkpoint"):
        quantize_checkpoint(src, tmp_path / "o")
    quantize_checkpoint(src, tmp_path / "o", overwrite=True)
    with pytest.raises(MobileMoEError, match="not a checkpoint directory"):
        quantize_checkpoint(tmp_path / "nope", tmp_path / "o2")
