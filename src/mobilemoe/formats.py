"""The storage formats, stated once: every module that reads or writes packed bytes imports them from here.

Three formats, from the file on disk to the bytes the kernels stream:

1. ``mobilemoe-int4-g32``, the INT4 checkpoint format of the released MobileMoE QAT checkpoints
   (``shared/specs/mobilemoe-checkpoint.md``):

   * symmetric, no zero point: ``value = code * scale``, ``code`` in [:data:`QMIN`, :data:`QMAX`];
   * one fp16 scale per :data:`GROUP_SIZE` consecutive values along the LAST axis of the logical
     tensor: linear weights are [out, in] (groups along ``in``), stacked experts [E, in, out] (groups
     along ``out``);
   * the one option (mobilemoe checkpoints only, never the released ones): the routed experts' group
     axis, :data:`EXPERT_GROUP_AXES`, set by the config field :data:`EXPERT_GROUP_AXIS_FIELD` and
     recorded in the ``quantization`` block as ``expert_group_axis`` (absent = ``out``). With ``in``
     each expert is stored TRANSPOSED, [E, out, in] grouped along its last axis (``in``): for each
     expert and output column, groups of 32 consecutive input rows, i.e. GGUF Q4_0's blocks, so
     llama.cpp export copies them code for code. :func:`int4_group_dim` states which logical dim a
     tensor's groups run along; codes and scales store that dim last (:func:`int4_shapes`);
   * two's-complement nibbles, two per byte, the even index in the LOW nibble (:func:`pack_int4`);
   * tensor names (:func:`int4_names`): ``X.weight`` -> ``X.qweight`` + ``X.weight_scale``;
     ``experts.gate_up_proj`` -> ``experts.gate_up_qweight`` + ``experts.gate_up_scale`` (likewise down).

2. ``mobilemoe-q4t16``, the native kernels' runtime layout, built at load time by
   :mod:`mobilemoe.kernels.pack` (bytes described there and in ``kernels/csrc/mm_common.h``, whose
   ``MM_*`` constants a test checks against these): rows in tiles of :data:`TILE_ROWS`, K in blocks
   of :data:`BLOCK_K`, :data:`BLOCK_BYTES` code bytes per (tile, block); a linear tile row is padded
   to a multiple of :data:`TILE_ALIGN` bytes; an expert's scale row holds ``in + in/32`` fp16 values.

3. ``mobilemoe-expert-store-v3``, the offloading runtime's expert store (:mod:`mobilemoe.runtime.offload`):
   one record per routed expert, :data:`RECORD_ALIGN`-aligned, holding the parts
   :data:`RECORD_PARTS` back to back (the order ``NativeModel.read_expert`` reads them in).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# ---------------------------------------------------------------------- 1. checkpoint INT4
INT4_FORMAT = "mobilemoe-int4-g32"
GROUP_SIZE = 32
QMIN, QMAX = -8, 7
SCALE_BYTES = 2  # fp16
_DTYPES = {"CODE_DTYPE": "uint8", "SCALE_DTYPE": "float16"}


def __getattr__(name: str) -> Any:
    """CODE_DTYPE / SCALE_DTYPE as torch dtypes, resolved on first use: the config and accounting
    modules read this registry and stay importable without torch (``mobilemoe info``, ``--help``)."""
    if name in _DTYPES:
        import torch

        return getattr(torch, _DTYPES[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

# The routed experts' INT4 group axis: "out" (the released format, the default) or "in".
EXPERT_GROUP_AXES = ("out", "in")
DEFAULT_EXPERT_GROUP_AXIS = "out"
EXPERT_GROUP_AXIS_FIELD = "expert_quant_group_axis"  # the MobileMoEConfig field that chooses it
# How the quantization block spells each axis ("out": the released checkpoints' text, verbatim).
EXPERT_GROUP_AXIS_TEXT = {"out": "out (last dim of [E, in, out])",
                          "in": "in (each expert stored transposed, last dim of [E, out, in])"}


def int4_quantization_block(expert_axis: str = DEFAULT_EXPERT_GROUP_AXIS) -> dict[str, Any]:
    """The ``quantization`` block of an INT4 checkpoint's config.json (``out``: the released one, verbatim)."""
    return {
        "format": INT4_FORMAT,
        "group_size": GROUP_SIZE,
        "embedding_group_size": GROUP_SIZE,
        "qmin": QMIN,
        "qmax": QMAX,
        "symmetric": True,
        "packed": True,
        "scale_dtype": _DTYPES["SCALE_DTYPE"],
        "linear_group_axis": "in (last dim of [out, in])",
        "expert_group_axis": EXPERT_GROUP_AXIS_TEXT[expert_axis],
    }


INT4_QUANTIZATION_BLOCK: dict[str, Any] = int4_quantization_block()


def block_expert_axis(block: dict[str, Any]) -> str | None:
    """The expert group axis a ``quantization`` block records: ``out`` when the field is absent (every
    checkpoint written before the option), None for a value that is not one of the known spellings."""
    value = block.get("expert_group_axis", EXPERT_GROUP_AXIS_TEXT[DEFAULT_EXPERT_GROUP_AXIS])
    for axis, text in EXPERT_GROUP_AXIS_TEXT.items():
        if value in (axis, text):
            return axis
    return None


def int4_group_dim(stacked_experts: bool, expert_axis: str = DEFAULT_EXPERT_GROUP_AXIS) -> int:
    """The dim of a logical tensor its INT4 groups run along: -1 (the last) for linear weights [out, in]
    and for experts [E, in, out] grouped along ``out``; -2 for experts grouped along ``in``."""
    if expert_axis not in EXPERT_GROUP_AXES:
        raise ValueError(f"expert group axis: expected one of {list(EXPERT_GROUP_AXES)}, got {expert_axis!r}")
    return -2 if stacked_experts and expert_axis == "in" else -1


def int4_names(name: str, stacked_experts: bool) -> tuple[str, str]:
    """The (codes, scales) tensor names that store the logical tensor ``name`` in the INT4 format."""
    if stacked_experts:  # ...experts.gate_up_proj -> ...experts.gate_up_qweight / gate_up_scale
        stem = name.removesuffix("_proj")
        return f"{stem}_qweight", f"{stem}_scale"
    stem = name.removesuffix(".weight")  # X.weight -> X.qweight / X.weight_scale
    return f"{stem}.qweight", f"{stem}.weight_scale"


# Name endings only the INT4 format uses: a float checkpoint holding them is already quantized.
INT4_SUFFIXES = tuple(n.removeprefix("x") for n in (*int4_names("x.weight", False), *int4_names("x_proj", True)))


def int4_shapes(shape: tuple[int, ...], group_dim: int = -1) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Logical shape -> (codes shape, scales shape), the grouped dim ``group_dim`` (:func:`int4_group_dim`)
    stored last: [..., n] -> [..., n/2] / [..., n/GROUP_SIZE] for -1; [..., m, n] -> [..., n, m/2] /
    [..., n, m/GROUP_SIZE] for -2."""
    shape = list(shape)
    shape.append(shape.pop(group_dim))
    *lead, n = shape
    return (*lead, n // 2), (*lead, n // GROUP_SIZE)


def int4_nbytes(numel: int) -> int:
    """Bytes of ``numel`` values in the INT4 format: half a byte each plus one fp16 scale per group."""
    return numel // 2 + numel // GROUP_SIZE * SCALE_BYTES


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int codes in [-8, 7], shape [..., n] (n even) -> uint8 [..., n/2]; even index = low nibble."""
    import torch

    if codes.shape[-1] % 2:
        raise ValueError(f"pack_int4: last dimension {codes.shape[-1]} is odd")
    nib = codes.to(torch.int16).bitwise_and(0xF).to(torch.uint8)
    return nib[..., 0::2] | (nib[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., n/2] -> int8 codes [..., n] in [-8, 7] (sign-extended two's-complement nibbles)."""
    import torch

    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_int4: expected uint8 packed codes, got {packed.dtype}")
    # For a 4-bit two's-complement nibble v, (v ^ 8) == v + 8 (mod 16): biased, then shifted back.
    biased = torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2) ^ 8
    return biased.view(torch.int8) - 8


# ---------------------------------------------------------------------- 2. runtime layout
RUNTIME_LAYOUT = "mobilemoe-q4t16"
TILE_ROWS = 16  # output rows per tile: one int32 lane per row of a 64-byte vector
BLOCK_K = GROUP_SIZE  # K per block: a linear block carries exactly one checkpoint scale per row
BLOCK_BYTES = TILE_ROWS * BLOCK_K // 2  # code bytes of one (tile, block)
TILE_ALIGN = 64  # a linear tile row is padded to whole cache lines


def linear_tile_stride(in_features: int) -> int:
    """Bytes of one packed linear tile row: its code blocks, then 16 fp16 row scales per block, padded."""
    raw = in_features // BLOCK_K * (BLOCK_BYTES + TILE_ROWS * SCALE_BYTES)
    return (raw + TILE_ALIGN - 1) // TILE_ALIGN * TILE_ALIGN


def expert_scale_row_len(in_features: int) -> int:
    """fp16 values of one packed expert scale row: ``in`` normalised scales, then one maximum per block."""
    return in_features + in_features // BLOCK_K


def packed_expert_nbytes(in_features: int, out_features: int) -> int:
    """Bytes of ONE expert matrix [in, out] in the runtime layout: code tiles plus its out/32 scale rows."""
    codes = out_features // TILE_ROWS * (in_features // BLOCK_K) * BLOCK_BYTES
    scales = out_features // GROUP_SIZE * expert_scale_row_len(in_features) * SCALE_BYTES
    return codes + scales


# ---------------------------------------------------------------------- 3. expert store
EXPERT_STORE_FORMAT = "mobilemoe-expert-store-v3"
RECORD_ALIGN = 4096  # page-aligned records: a miss is one read of whole pages
RECORD_PARTS = ("gu_codes", "gu_scales", "dn_codes", "dn_scales")  # gate_up then down, codes then scales
