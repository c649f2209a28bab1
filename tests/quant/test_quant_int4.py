"""The mobilemoe-int4-g32 encoding: nibble order, two's complement, error bounds."""

from __future__ import annotations

import pytest
import torch

from mobilemoe.quant import GROUP_SIZE, dequantize, fake_quantize, pack_int4, quantize, unpack_int4


def test_unpack_hand_made_bytes():
    # 0xF1: low nibble 0x1 -> +1 (index 0), high nibble 0xF -> -1 (index 1)
    # 0x87: low 0x7 -> +7, high 0x8 -> -8;  0x80: low 0 -> 0, high -8;  0x08: low -8, high 0
    packed = torch.tensor([0xF1, 0x87, 0x80, 0x08, 0x00, 0xFF], dtype=torch.uint8)
    assert unpack_int4(packed).tolist() == [1, -1, 7, -8, 0, -8, -8, 0, 0, 0, -1, -1]


def test_pack_hand_made_codes():
    codes = torch.tensor([[1, -1, 7, -8], [-8, 0, 3, -3]], dtype=torch.int8)
    assert pack_int4(codes).tolist() == [[0xF1, 0x87], [0x08, 0xD3]]


def test_pack_unpack_round_trip_every_code():
    codes = torch.arange(-8, 8, dtype=torch.int8)
    grid = torch.cartesian_prod(codes, codes).to(torch.int8)  # every (even, odd) pair -> every byte
    packed = pack_int4(grid)
    assert packed.dtype == torch.uint8 and packed.shape == (256, 1)
    assert sorted(packed.flatten().tolist()) == list(range(256))
    assert torch.equal(unpack_int4(packed), grid)
    x = torch.randint(-8, 8, (3, 5, 64), dtype=torch.int8)
    assert torch.equal(unpack_int4(pack_int4(x)), x)


def test_pack_rejects_odd_and_unpack_rejects_non_uint8():
    with pytest.raises(ValueError):
        pack_int4(torch.zeros(3, dtype=torch.int8))
    with pytest.raises(TypeError):
        unpack_int4(torch.zeros(4, dtype=torch.int8))


def test_quantize_error_bounds():
    torch.manual_seed(0)
    w = torch.randn(64, 256) * 0.05
    packed, scales = quantize(w)
    assert packed.shape == (64, 128) and packed.dtype == torch.uint8
    assert scales.shape == (64, 256 // GROUP_SIZE) and scales.dtype == torch.float16
    deq = dequantize(packed, scales)
    s = scales.float().abs().repeat_interleave(GROUP_SIZE, dim=-1)
    err = (deq - w).abs()
    # the largest |value| of each group is (its fp16 rounding) exactly: code -8
    groups = w.unflatten(-1, (-1, GROUP_SIZE))
    extreme = groups.gather(-1, groups.abs().argmax(-1, keepdim=True)).squeeze(-1)
    codes = unpack_int4(packed).unflatten(-1, (-1, GROUP_SIZE))
    assert (codes.gather(-1, groups.abs().argmax(-1, keepdim=True)) == -8).all()
    torch.testing.assert_close(-8 * scales.float(), extreme.half().float(), rtol=0, atol=0)
    # everywhere |err| <= |scale| (the +8 side clamps to 7), and <= |scale|/2 where nothing clamps
    assert (err <= s * (1 + 1e-3)).all()
    unclamped = (w / -scales.float().repeat_interleave(GROUP_SIZE, -1) * -1).abs() <= 7.5
    assert (err[unclamped] <= s[unclamped] * (0.5 + 1e-3)).all()
    rel_rms = ((deq - w).norm() / w.norm()).item()
    assert rel_rms < 0.12, rel_rms


def test_fake_quantize_equals_decode_and_is_idempotent():
    torch.manual_seed(1)
    w = torch.randn(4, 8, 96)
    fq = fake_quantize(w)
    assert torch.equal(fq, dequantize(*quantize(w)))
    assert torch.equal(fake_quantize(fq), fq)  # re-quantizing a QAT weight changes nothing
    codes, scales = quantize(fq)
    assert torch.equal(dequantize(codes, scales), fq)


def test_zero_group_and_bf16_input():
    w = torch.zeros(2, 64)
    w[1, 32:] = torch.linspace(-1, 1, 32)
    packed, scales = quantize(w)
    assert scales[0].abs().sum() == 0 and (dequantize(packed, scales)[0] == 0).all()
    # A bf16 weight fake-quantizes to the bf16 rounding of the exact decode: code * fp16 scale needs
    # up to 14 significant bits, so the fp32 decode is exact and the bf16 one is rounded.
    wb = torch.randn(8, 64).to(torch.bfloat16)
    assert torch.equal(dequantize(*quantize(wb), dtype=torch.bfloat16), fake_quantize(wb))
    assert torch.equal(dequantize(*quantize(wb)), fake_quantize(wb.float()))
