"""The ``mobilemoe-int4-g32`` encoding, exactly as in the released MobileMoE checkpoints.

* Symmetric, no zero point: ``value = code * scale``, ``code`` in [-8, 7], one fp16 scale per 32
  consecutive values along the LAST axis of the logical tensor.
* Two's-complement nibbles, two per byte; the even index is the LOW nibble of its byte.
* Linear weights are logical [out, in], so groups run along ``in``; stacked expert weights are
  logical [E, in, out], so groups run along ``out``. Both are "the last axis", so one pair of
  functions serves every tensor.

The rounding rule of the released codes is not published (only decoding is fixed). Ours is
llama.cpp's Q4_0 rule: the scale is SIGNED, ``scale = w_extreme / -8`` where ``w_extreme`` is the
group's value of largest magnitude (rounded to fp16 first), so that value maps to code -8 exactly;
the rest round to nearest and clamp to [-8, 7]. Scales may therefore be negative (decoding is
unchanged), and a group's codes equal Q4_0's ``q - 8``, so GGUF Q4_0 export is exact.
"""

from __future__ import annotations

import torch

GROUP_SIZE = 32
QMIN, QMAX = -8, 7


def _check_groups(n: int, group_size: int, what: str) -> None:
    if n % group_size:
        raise ValueError(f"{what}: last dimension {n} is not a multiple of the group size {group_size}")


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int codes in [-8, 7], shape [..., n] (n even) -> uint8 [..., n/2]; even index = low nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_int4: last dimension {codes.shape[-1]} is odd")
    nib = codes.to(torch.int16).bitwise_and(0xF).to(torch.uint8)
    return nib[..., 0::2] | (nib[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., n/2] -> int8 codes [..., n] in [-8, 7] (sign-extended two's-complement nibbles)."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_int4: expected uint8 packed codes, got {packed.dtype}")
    low = (packed & 0xF).to(torch.int8)
    high = (packed >> 4).to(torch.int8)
    codes = torch.stack((low, high), dim=-1).flatten(-2)
    return torch.where(codes >= 8, codes - 16, codes)


def quantize(w: torch.Tensor, group_size: int = GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric group quantization along the last axis -> (packed uint8 [..., n/2], fp16 scales [..., n/g]).

    Raises ``ValueError`` on NaN/inf input or a scale beyond fp16: either would be stored as a
    poisoned scale that decodes every value of its group to NaN/inf.
    """
    if w.is_floating_point() and not bool(torch.isfinite(w).all()):
        raise ValueError("quantize: the tensor has non-finite values (NaN/inf)")
    codes, scales = _codes_and_scales(w, group_size)
    if not bool(torch.isfinite(scales).all()):
        raise ValueError("quantize: a group's largest |value| / 8 overflows the fp16 scale")
    return pack_int4(codes), scales


def _codes_and_scales(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    _check_groups(w.shape[-1], group_size, "quantize")
    groups = w.float().unflatten(-1, (-1, group_size))
    extreme = groups.gather(-1, groups.abs().argmax(-1, keepdim=True)).squeeze(-1)
    scales = (extreme / QMIN).to(torch.float16)
    safe = torch.where(scales == 0, torch.ones_like(scales), scales).float()
    codes = torch.clamp(torch.round(groups / safe.unsqueeze(-1)), QMIN, QMAX).to(torch.int8)
    return codes.flatten(-2), scales


def dequantize(packed: torch.Tensor, scales: torch.Tensor, group_size: int = GROUP_SIZE,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The reference decode: ``code * scale`` -> [..., n] in ``dtype``."""
    codes = unpack_int4(packed).float().unflatten(-1, (-1, group_size))
    if codes.shape[:-1] != scales.shape:
        raise ValueError(f"dequantize: codes imply scale shape {tuple(codes.shape[:-1])}, got {tuple(scales.shape)}")
    return (codes * scales.float().unsqueeze(-1)).flatten(-2).to(dtype)


def fake_quantize(w: torch.Tensor, group_size: int = GROUP_SIZE) -> torch.Tensor:
    """quantize -> dequantize in one step, in w's dtype (QAT forward; wrap with an STE for training)."""
    codes, scales = _codes_and_scales(w, group_size)
    groups = codes.float().unflatten(-1, (-1, group_size)) * scales.float().unsqueeze(-1)
    return groups.flatten(-2).to(w.dtype)
