"""Native INT4 CPU kernels (``mobilemoe._C``) for ``mobilemoe-int4-g32`` weights.

Weights are repacked once at load time (:mod:`mobilemoe.kernels.pack`, lossless); activations are
quantized on the fly to int8 per block of 32 (Q8_0-style) and multiplied with int8 dot products
(AVX-512 VNNI ``vpdpbusd``; AVX2 ``vpmaddubsw``; portable C++), accumulating per-block scale
products in fp32 -- llama.cpp's Q4_0 x Q8_0 scheme. Results equal the dequantize-then-matmul
references of :mod:`mobilemoe.kernels.reference` up to that activation rounding.

ISA: picked at run time (best the CPU supports); forced by ``MOBILEMOE_KERNEL_ISA=amx|avx512|avx2|portable``
(aarch64 builds: ``i8mm|dotprod|neon|portable``; read at the first kernel call and again after
``set_isa(None)``) or :func:`set_isa` (takes precedence). The decision is cached (``dispatch.cpp``) and
governs every native kernel: these matmuls and also ``NativeModel``'s decode attention, router and
BF16 prefill attention (re-read at each forward; ``NativeModel.kernel_paths()`` names the paths the last forward took). Threads: ``torch.set_num_threads``;
runner: the kernels' job pool, or ``MOBILEMOE_KERNEL_THREADING=omp`` for at::parallel_for (README.md).

If the extension is not built, constructing packed weights still works, but calling a kernel raises
:class:`KernelsUnavailableError` (the references stay available). The normal install
(``pip install --no-build-isolation -e .``) builds it.
"""

from __future__ import annotations

import torch

from mobilemoe.kernels import reference
from mobilemoe.kernels.pack import pack_experts, pack_linear

try:
    from mobilemoe import _C  # noqa: F401
    _IMPORT_ERROR: Exception | None = None
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    _C = None
    _IMPORT_ERROR = exc

__all__ = [
    "KernelsUnavailableError", "PackedExperts", "PackedLinear", "PackedMoE", "PackedSwiGLU",
    "active_isa", "available_isas", "is_available", "moe_forward", "pack_experts", "pack_linear", "reference",
    "set_isa",
]


class KernelsUnavailableError(RuntimeError):
    """The native extension mobilemoe._C is not built/importable."""


def is_available() -> bool:
    return _C is not None


def _lib():
    if _C is None:
        raise KernelsUnavailableError(
            "mobilemoe native kernels (mobilemoe._C) are not built: "
            f"{_IMPORT_ERROR}. Reinstall with `pip install --no-build-isolation -e '.[dev]'` "
            "(needs a C++17 compiler), or use mobilemoe.kernels.reference (pure PyTorch, slow)."
        )
    return _C


def available_isas() -> list[str]:
    """ISAs this CPU can run, best first (subset of ['avx512', 'avx2', 'portable'])."""
    return list(_lib().available_isas())


def active_isa() -> str:
    """The ISA the next kernel call uses: set_isa() > MOBILEMOE_KERNEL_ISA > best available."""
    return _lib().active_isa()


def set_isa(isa: str | None) -> None:
    """Force 'amx' | 'avx512' | 'avx2' | 'portable' (aarch64: 'i8mm' | 'dotprod' | 'neon' | 'portable') for every kernel (matmuls, NativeModel's attention and
    router); None/'auto' returns to env var / auto-detection."""
    _lib().set_isa("" if isa is None else isa)


def _as_rows(x: torch.Tensor, features: int, what: str) -> tuple[torch.Tensor, tuple[int, ...]]:
    if x.shape[-1] != features:
        raise ValueError(f"{what}: expected last dimension {features}, got {tuple(x.shape)}")
    lead = tuple(x.shape[:-1])
    return x.reshape(-1, features).to(torch.float32).contiguous(), lead


class PackedLinear:
    """An INT4 linear weight W [out, in] in the runtime layout. ``y = self(x) = x @ dequant(W).T``."""

    def __init__(self, data: torch.Tensor, out_features: int, in_features: int) -> None:
        self.data = data
        self.out_features = out_features
        self.in_features = in_features

    @classmethod
    def from_quantized(cls, qweight: torch.Tensor, scale: torch.Tensor) -> "PackedLinear":
        """qweight uint8 [out, in/2], scale fp16 [out, in/32] (mobilemoe-int4-g32)."""
        return cls(pack_linear(qweight, scale), qweight.shape[0], qweight.shape[1] * 2)

    @classmethod
    def concat(cls, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> "PackedLinear":
        """Several [out_i, in] weights stacked along out (e.g. fused gate/up), lossless."""
        return cls.from_quantized(torch.cat([q for q, _ in parts]), torch.cat([s for _, s in parts]))

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] (any float dtype) -> [..., out] in x's dtype (computed in fp32)."""
        rows, lead = _as_rows(x, self.in_features, "PackedLinear")
        y = _lib().linear_forward(self.data, self.out_features, self.in_features, rows)
        return y.reshape(*lead, self.out_features).to(x.dtype)


class PackedExperts:
    """Stacked INT4 experts W [E, in, out] (groups along out). ``self(x, e) = x @ dequant(W[e])``."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, in_features: int, out_features: int) -> None:
        self.codes = codes
        self.scales = scales
        self.num_experts = codes.shape[0]
        self.in_features = in_features
        self.out_features = out_features

    @classmethod
    def from_quantized(cls, qweight: torch.Tensor, scale: torch.Tensor) -> "PackedExperts":
        """qweight uint8 [E, in, out/2], scale fp16 [E, in, out/32] (mobilemoe-int4-g32)."""
        codes, scales = pack_experts(qweight, scale)
        return cls(codes, scales, qweight.shape[1], qweight.shape[2] * 2)

    @property
    def nbytes(self) -> int:
        return self.codes.numel() + self.scales.numel() * 2

    def __call__(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        rows, lead = _as_rows(x, self.in_features, "PackedExperts")
        y = _lib().expert_forward(self.codes, self.scales, self.in_features, self.out_features, int(expert), rows)
        return y.reshape(*lead, self.out_features).to(x.dtype)


class PackedSwiGLU:
    """Shared expert / dense FFN ``down(silu(gate(x)) * up(x))`` with gate and up fused into one weight."""

    def __init__(self, gate_up: PackedLinear, down: PackedLinear) -> None:
        if gate_up.out_features % 2 or down.in_features * 2 != gate_up.out_features:
            raise ValueError("PackedSwiGLU: gate_up must be [2S, H] and down [H, S]")
        self.gate_up = gate_up
        self.down = down
        self.width = down.in_features

    @classmethod
    def from_quantized(cls, gate: tuple[torch.Tensor, torch.Tensor], up: tuple[torch.Tensor, torch.Tensor],
                       down: tuple[torch.Tensor, torch.Tensor]) -> "PackedSwiGLU":
        """Each argument is (qweight uint8 [out, in/2], scale fp16 [out, in/32]): gate/up [S, H], down [H, S]."""
        return cls(PackedLinear.concat([gate, up]), PackedLinear.from_quantized(*down))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.gate_up(x.float()).chunk(2, dim=-1)
        return self.down(torch.nn.functional.silu(g) * u).to(x.dtype)


def moe_forward(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, gate_up: PackedExperts,
                down: PackedExperts, shared: PackedSwiGLU | None = None) -> torch.Tensor:
    """One fused MoE layer in one native call.

    x [..., H]; expert_ids, weights [..., k]; gate_up: experts [E, H, 2I] (gate = first I columns);
    down: experts [E, I, H]; shared: optional always-on SwiGLU. Returns
    ``sum_j weights_j * down_e(silu(gate_e(x)) * up_e(x)) + shared(x)`` in x's dtype.
    Only the chosen experts' bytes are read; tokens are grouped by expert (stable counting sort) and
    each expert runs as one GEMM over its tokens, results scatter-added with the routing weights.
    """
    H = x.shape[-1]
    if gate_up.in_features != H or down.out_features != H or gate_up.out_features != 2 * down.in_features:
        raise ValueError("moe_forward: expected gate_up [E, H, 2I] and down [E, I, H] matching x [..., H]")
    if gate_up.num_experts != down.num_experts:
        raise ValueError("moe_forward: gate_up and down have different expert counts")
    rows, lead = _as_rows(x, H, "moe_forward")
    ids = expert_ids.reshape(rows.shape[0], -1).to(torch.int64).contiguous()
    w = weights.reshape(rows.shape[0], -1).to(torch.float32).contiguous()
    if shared is not None:
        if shared.gate_up.in_features != H or shared.down.out_features != H:
            raise ValueError("moe_forward: shared expert does not match hidden size")
        sgu, sdn, S = shared.gate_up.data, shared.down.data, shared.width
    else:
        empty = torch.empty(0, 0, dtype=torch.uint8)
        sgu, sdn, S = empty, empty, 0
    y = _lib().moe_forward(rows, ids, w, gate_up.codes, gate_up.scales, down.codes, down.scales,
                           down.in_features, sgu, sdn, S)
    return y.reshape(*lead, H).to(x.dtype)


class PackedMoE:
    """Routed experts (+ optional shared expert) of one MoE layer, packed; ``self(x, ids, weights)``."""

    def __init__(self, gate_up: PackedExperts, down: PackedExperts, shared: PackedSwiGLU | None = None) -> None:
        self.gate_up, self.down, self.shared = gate_up, down, shared

    @classmethod
    def from_quantized(cls, gate_up: tuple[torch.Tensor, torch.Tensor], down: tuple[torch.Tensor, torch.Tensor],
                       shared: tuple | None = None) -> "PackedMoE":
        """gate_up/down: (qweight, scale) stacked experts; shared: ((gq, gs), (uq, us), (dq, ds)) or None."""
        sh = PackedSwiGLU.from_quantized(*shared) if shared is not None else None
        return cls(PackedExperts.from_quantized(*gate_up), PackedExperts.from_quantized(*down), sh)

    def __call__(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return moe_forward(x, expert_ids, weights, self.gate_up, self.down, self.shared)

