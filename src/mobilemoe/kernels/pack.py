"""Load-time repacking of ``mobilemoe-int4-g32`` tensors into the kernels' runtime layout.

Lossless: the same int4 codes and the same fp16 scales, only reordered. The layout's constants
live in :mod:`mobilemoe.formats`; its bytes are these (see also csrc/mm_common.h):

Runtime layout ``mobilemoe-q4t16``:
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

from mobilemoe.formats import (
    BLOCK_BYTES,
    BLOCK_K,
    GROUP_SIZE,
    SCALE_DTYPE,
    TILE_ROWS,
    linear_tile_stride,
    unpack_int4,
)

__all__ = ["linear_tile_stride", "pack_experts", "pack_linear"]

CHUNKS = 4  # 64-byte chunks per (tile, block): each a 16 rows x 4 k slab (csrc/mm_common.h)
KK = 4  # consecutive k per row inside a chunk


def _biased_nibbles(qweight: torch.Tensor) -> torch.Tensor:
    """uint8 [..., n/2] packed checkpoint codes -> uint8 [..., n] holding code + 8 (0..15): the kernels
    store codes unsigned and remove the bias per activation block."""
    return (unpack_int4(qweight) + 8).view(torch.uint8)


def _tile_codes(u: torch.Tensor) -> torch.Tensor:
    """biased codes uint8 [..., R, K] (0..15; R % 16 == 0, K % 32 == 0) -> uint8 [..., R/16, K/32 * 256]."""
    *lead, R, K = u.shape
    # dims: tile, row-in-tile, block, chunk, half (k-group parity), kk
    u = u.reshape(*lead, R // TILE_ROWS, TILE_ROWS, K // BLOCK_K, CHUNKS, 2, KK)
    n = len(lead)
    perm = list(range(n)) + [n + 0, n + 2, n + 3, n + 1, n + 5, n + 4]
    u = u.permute(*perm)  # tile, block, chunk, row, kk, half
    packed = u[..., 0] | (u[..., 1] << 4)
    return packed.reshape(*lead, R // TILE_ROWS, (K // BLOCK_K) * BLOCK_BYTES).contiguous()


def pack_linear(qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(uint8 [out, in/2], fp16 [out, in/32]) -> uint8 [ceil(out/16), tile_stride]."""
    if qweight.dtype != torch.uint8 or qweight.dim() != 2:
        raise TypeError(f"pack_linear: expected uint8 [out, in/2] codes, got {qweight.dtype} {tuple(qweight.shape)}")
    out_f, in_f = qweight.shape[0], qweight.shape[1] * 2
    if in_f % BLOCK_K:
        raise ValueError(f"pack_linear: in_features {in_f} is not a multiple of {BLOCK_K}")
    nkb = in_f // BLOCK_K  # == in_f // GROUP_SIZE: one checkpoint scale per (row, block)
    if tuple(scale.shape) != (out_f, nkb):
        raise ValueError(f"pack_linear: scale shape {tuple(scale.shape)}, expected {(out_f, nkb)}")
    codes = _biased_nibbles(qweight.cpu())
    scale = scale.cpu().to(SCALE_DTYPE)
    pad = (-out_f) % TILE_ROWS
    if pad:  # padding rows: code 0 (biased 8), scale 0
        codes = torch.cat([codes, codes.new_full((pad, in_f), 8)])
        scale = torch.cat([scale, scale.new_zeros(pad, nkb)])
    ntiles = (out_f + pad) // TILE_ROWS
    tiles = _tile_codes(codes)  # [ntiles, nkb*256]
    sc = scale.reshape(ntiles, TILE_ROWS, nkb).transpose(1, 2).contiguous()  # [ntiles, nkb, 16]
    sc_bytes = sc.view(torch.uint8).reshape(ntiles, -1)
    packed = torch.zeros(ntiles, linear_tile_stride(in_f), dtype=torch.uint8)
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
    if in_f % BLOCK_K or out_f % GROUP_SIZE:
        raise ValueError(f"pack_experts: in {in_f} and out {out_f} must be multiples of {BLOCK_K}")
    if tuple(scale.shape) != (E, in_f, out_f // GROUP_SIZE):
        raise ValueError(f"pack_experts: scale shape {tuple(scale.shape)}, expected {(E, in_f, out_f // GROUP_SIZE)}")
    qweight = qweight.cpu()
    tiles = torch.empty(E, (out_f // TILE_ROWS) * (in_f // BLOCK_K) * BLOCK_BYTES, dtype=torch.uint8)
    step = max(1, (1 << 26) // (in_f * out_f))  # ~64M codes per step bounds the load-time peak memory
    for e0 in range(0, E, step):
        u = _biased_nibbles(qweight[e0: e0 + step]).transpose(1, 2)  # codes as [e, out, in]
        tiles[e0: e0 + step] = _tile_codes(u).reshape(u.shape[0], -1)
    return tiles, _normalised_scale_rows(scale.cpu().to(SCALE_DTYPE).transpose(1, 2))


def _normalised_scale_rows(scales: torch.Tensor) -> torch.Tensor:
    """fp16 [E, G, in] -> fp16 [E, G, in + in/32]: per input block of 32, sn = scale * (1 / max|scale|)
    (fp32, then fp16) followed by the block maxima."""
    E, G, K = scales.shape
    blocks = scales.float().reshape(E, G, K // BLOCK_K, BLOCK_K)
    smax = blocks.abs().amax(dim=-1)
    inv = torch.where(smax > 0, torch.ones_like(smax) / smax, torch.zeros_like(smax))
    sn = (blocks * inv[..., None]).reshape(E, G, K)
    return torch.cat([sn, smax], dim=-1).to(SCALE_DTYPE).contiguous()
