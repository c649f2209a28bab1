"""Quantizing to the ``mobilemoe-int4-g32`` format (the format itself: :mod:`mobilemoe.formats`).

Decoding is fixed by the format (``value = code * scale``); the rounding rule of the released codes
is not published. Ours is llama.cpp's Q4_0 rule: the scale is SIGNED, ``scale = w_extreme / -8``
where ``w_extreme`` is the group's value of largest magnitude (rounded to fp16 first), so that value
maps to code -8 exactly; the rest round to nearest and clamp to [-8, 7]. Scales may therefore be
negative (decoding is unchanged), and a group's codes equal Q4_0's ``q - 8``, so GGUF Q4_0 export
is exact.

Groups run along the last axis; ``group_dim=-2`` (routed experts grouped along ``in``, see
:func:`mobilemoe.formats.int4_group_dim`) groups along the second-to-last instead by moving that dim
last: :func:`quantize` returns codes and scales in that stored (transposed) layout, :func:`dequantize`
and :func:`fake_quantize` give back the logical layout. The rounding rule itself is stated once, in
:func:`_codes_and_scales`.
"""

from __future__ import annotations

import torch

from mobilemoe.formats import GROUP_SIZE, QMAX, QMIN, SCALE_DTYPE, pack_int4, unpack_int4

__all__ = ["GROUP_SIZE", "QMAX", "QMIN", "dequantize", "fake_quantize", "pack_int4", "quantize", "unpack_int4"]


def _check_groups(n: int, group_size: int, what: str) -> None:
    if n % group_size:
        raise ValueError(f"{what}: last dimension {n} is not a multiple of the group size {group_size}")


def quantize(w: torch.Tensor, group_size: int = GROUP_SIZE, group_dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric group quantization along ``group_dim`` -> (packed uint8 [..., n/2], fp16 scales [..., n/g]),
    ``group_dim`` stored last.

    Raises ``ValueError`` on NaN/inf input or a scale beyond fp16: either would be stored as a
    poisoned scale that decodes every value of its group to NaN/inf.
    """
    if w.is_floating_point() and not bool(torch.isfinite(w).all()):
        raise ValueError("quantize: the tensor has non-finite values (NaN/inf)")
    codes, scales = _codes_and_scales(w.movedim(group_dim, -1), group_size)
    if not bool(torch.isfinite(scales).all()):
        raise ValueError("quantize: a group's largest |value| / 8 overflows the fp16 scale")
    return pack_int4(codes), scales


def _codes_and_scales(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    _check_groups(w.shape[-1], group_size, "quantize")
    groups = w.float().unflatten(-1, (-1, group_size))
    extreme = groups.gather(-1, groups.abs().argmax(-1, keepdim=True)).squeeze(-1)
    scales = (extreme / QMIN).to(SCALE_DTYPE)
    safe = torch.where(scales == 0, torch.ones_like(scales), scales).float()
    codes = torch.clamp(torch.round(groups / safe.unsqueeze(-1)), QMIN, QMAX).to(torch.int8)
    return codes.flatten(-2), scales


def dequantize(packed: torch.Tensor, scales: torch.Tensor, group_size: int = GROUP_SIZE,
               dtype: torch.dtype = torch.float32, group_dim: int = -1) -> torch.Tensor:
    """The reference decode: ``code * scale`` -> [..., n] in ``dtype`` (the grouped last dim moved back
    to ``group_dim``: the logical layout)."""
    codes = unpack_int4(packed).float().unflatten(-1, (-1, group_size))
    if codes.shape[:-1] != scales.shape:
        raise ValueError(f"dequantize: codes imply scale shape {tuple(codes.shape[:-1])}, got {tuple(scales.shape)}")
    return (codes * scales.float().unsqueeze(-1)).flatten(-2).movedim(-1, group_dim).contiguous().to(dtype)


def fake_quantize(w: torch.Tensor, group_size: int = GROUP_SIZE, group_dim: int = -1) -> torch.Tensor:
    """quantize -> dequantize in one step, in w's dtype and layout (QAT forward; wrap with an STE for training)."""
    codes, scales = _codes_and_scales(w.movedim(group_dim, -1), group_size)
    groups = codes.float().unflatten(-1, (-1, group_size)) * scales.float().unsqueeze(-1)
    return groups.flatten(-2).movedim(-1, group_dim).contiguous().to(w.dtype)
