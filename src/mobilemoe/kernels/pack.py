"""Load-time repacking of ``mobilemoe-int4-g32`` tensors into the kernels' runtime layout.

Lossless: the same int4 codes and the same fp16 scales, only reordered.

Runtime layout ``mobilemoe-q4t16`` (see csrc/mm_common.h):
* Rows (output features) in tiles of 16, K (input features) in blocks of 32.
* Linear weight -> uint8 [ceil(out/16), tile_stride]; a tile row is
  ``[K/32 blocks x 256 code bytes][K/32 x 16 fp16 scales]`` padded to a multiple of 64 bytes.
  Inside a block, 4 chunks of 64 bytes; chunk c byte r*4+kk = (code(r, 32b+8c+kk)+8) in the low
  nibble and (code(r, 32b+8c+4+kk)+8) in the high nibble. Padding rows are code 0, scale 0.
* Stacked experts (logical [E, in, out], groups along out) -> codes transposed to [E, out, in]
  and tiled as above WITHOUT row scales (uint8 [E, out/16 * in/32 * 256]), plus one fp16 scale
  row per (expert, out-group g) [E, out/32, in + in/32]: the scales scale[:, g] normalised by
  their maximum per input block of 32 (rounded to fp16), then those maxima (exact). The kernel
  folds scale[i, g] into the activation of out-group g. Codes and linear scales are packed
  losslessly; the normalised expert scales are within fp16 rounding (2^-11 relative) of the
  checkpoint's, 8x finer than the int8 activations they multiply.
"""

from __future__ import annotations

import torch


TILE = 16
QK = 32
BLOCK_BYTES = 256


def _biased_nibbles(qweight: torch.Tensor) -> torch.Tensor:
    """uint8 [..., n/2] packed two's-complement nibbles -> uint8 [..., n] holding code + 8 (0..15).

    For a 4-bit two's-complement nibble v, (v + 8) mod 16 == v ^ 8, so no sign extension is needed.
    """
    lo = (qweight & 0xF) ^ 8
    hi = (qweight >> 4) ^ 8
    return torch.stack((lo, hi), dim=-1).flatten(-2)


def _tile_codes(u: torch.Tensor) -> torch.Tensor:
    """biased codes uint8 [..., R, K] (0..15; R % 16 == 0, K % 32 == 0) -> uint8 [..., R/16, K/32 * 256]."""
    *lead, R, K = u.shape
    # dims: tile, row-in-tile, block, chunk, half (k-group parity), kk
    u = u.reshape(*lead, R // TILE, TILE, K // QK, 4, 2, 4)
    n = len(lead)
    perm = list(range(n)) + [n + 0, n + 2, n + 3, n + 1, n + 5, n + 4]
    u = u.permute(*perm)  # tile, block, chunk, row, kk, half
    packed = u[..., 0] | (u[..., 1] << 4)
    return packed.reshape(*lead, R // TILE, (K // QK) * BLOCK_BYTES).contiguous()


def linear_tile_stride(in_features: int) -> int:
    nkb = in_features // QK
    raw = nkb * (BLOCK_BYTES + 2 * TILE)
    return (raw + 63) // 64 * 64


def pack_linear(qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(uint8 [out, in/2], fp16 [out, in/32]) -> uint8 [ceil(out/16), tile_stride]."""
    if qweight.dtype != torch.uint8 or qweight.dim() != 2:
        raise TypeError(f"pack_linear: expected uint8 [out, in/2] codes, got {qweight.dtype} {tuple(qweight.shape)}")
    out_f, in_f = qweight.shape[0], qweight.shape[1] * 2
    if in_f % QK:
        raise ValueError(f"pack_linear: in_features {in_f} is not a multiple of {QK}")
    if tuple(scale.shape) != (out_f, in_f // QK):
        raise ValueError(f"pack_linear: scale shape {tuple(scale.shape)}, expected {(out_f, in_f // QK)}")
    codes = _biased_nibbles(qweight.cpu())
    scale = scale.cpu().to(torch.float16)
    pad = (-out_f) % TILE
    if pad:  # padding rows: code 0 (biased 8), scale 0
        codes = torch.cat([codes, codes.new_full((pad, in_f), 8)])
        scale = torch.cat([scale, scale.new_zeros(pad, in_f // QK)])
    ntiles = (out_f + pad) // TILE
    tiles = _tile_codes(codes)  # [ntiles, nkb*256]
    sc = scale.reshape(ntiles, TILE, in_f // QK).transpose(1, 2).contiguous()  # [ntiles, nkb, 16]
    sc_bytes = sc.view(torch.uint8).reshape(ntiles, -1)
    stride = linear_tile_stride(in_f)
    packed = torch.zeros(ntiles, stride, dtype=torch.uint8)
    packed[:, : tiles.shape[1]] = tiles
    packed[:, tiles.shape[1]: tiles.shape[1] + sc_bytes.shape[1]] = sc_bytes
    return packed


def pack_experts(qweight: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 [E, in, out/2], fp16 [E, in, out/32]) -> (uint8 [E, out/16 * in/32 * 256] code tiles,
    fp16 [E, out/32, in + in/32] scale rows). Scale row (e, g) is [sn | smax]: smax[b] = max|scale|
    over input block b (exact) and sn = scale / smax[b] rounded to fp16 (0 in an all-zero block), the
    form the expert kernels quantize activations against (see csrc/mm_common.h)."""
    if qweight.dtype != torch.uint8 or qweight.dim() != 3:
        raise TypeError(f"pack_experts: expected uint8 [E, in, out/2] codes, got {qweight.dtype} {tuple(qweight.shape)}")
    E, in_f, out_f = qweight.shape[0], qweight.shape[1], qweight.shape[2] * 2
    if in_f % QK or out_f % QK:
        raise ValueError(f"pack_experts: in {in_f} and out {out_f} must be multiples of {QK}")
    if tuple(scale.shape) != (E, in_f, out_f // QK):
        raise ValueError(f"pack_experts: scale shape {tuple(scale.shape)}, expected {(E, in_f, out_f // QK)}")
    qweight = qweight.cpu()
    tiles = torch.empty(E, (out_f // TILE) * (in_f // QK) * BLOCK_BYTES, dtype=torch.uint8)
    step = max(1, (1 << 26) // (in_f * out_f))  # ~64M codes per step bounds the load-time peak memory
    for e0 in range(0, E, step):
        u = _biased_nibbles(qweight[e0: e0 + step]).transpose(1, 2)  # codes as [e, out, in]
        tiles[e0: e0 + step] = _tile_codes(u).reshape(u.shape[0], -1)
    return tiles, _normalised_scale_rows(scale.cpu().to(torch.float16).transpose(1, 2))


def _normalised_scale_rows(scales: torch.Tensor) -> torch.Tensor:
    """fp16 [E, G, in] -> fp16 [E, G, in + in/32]: per input block of 32, sn = scale * (1 / max|scale|)
    (fp32, then fp16) followed by the block maxima."""
    E, G, K = scales.shape
    blocks = scales.float().reshape(E, G, K // QK, QK)
    smax = blocks.abs().amax(dim=-1)
    inv = torch.where(smax > 0, torch.ones_like(smax) / smax, torch.zeros_like(smax))
    sn = (blocks * inv[..., None]).reshape(E, G, K)
    return torch.cat([sn, smax], dim=-1).to(torch.float16).contiguous()
