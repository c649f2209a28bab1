"""Pure-PyTorch references for the native kernels: dequantize (mobilemoe-int4-g32), then fp32 matmul.

These define what the kernels compute. The kernels differ only by the int8 rounding of activations
(per block of 32, Q8_0-style) and fp32 summation order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mobilemoe.quant import dequantize


def linear_ref(qweight: torch.Tensor, scale: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ dequant(W [out, in]).T -> [..., out] in fp32."""
    return x.float() @ dequantize(qweight, scale).T


def expert_ref(qweight: torch.Tensor, scale: torch.Tensor, e: int, x: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ dequant(W[e]) for stacked experts W [E, in, out] -> [..., out] in fp32."""
    return x.float() @ dequantize(qweight[e], scale[e])


def swiglu_ref(gate: tuple[torch.Tensor, torch.Tensor], up: tuple[torch.Tensor, torch.Tensor],
               down: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) on (qweight, scale) linear weights, fp32."""
    return linear_ref(*down, F.silu(linear_ref(*gate, x)) * linear_ref(*up, x))


def moe_ref(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
            gate_up: tuple[torch.Tensor, torch.Tensor], down: tuple[torch.Tensor, torch.Tensor],
            shared: tuple | None = None) -> torch.Tensor:
    """Reference MoE layer: loop over experts with dequantized weights.

    x [T, H]; expert_ids, weights [T, k]; gate_up = (qweight [E, H, 2I/2], scale [E, H, 2I/32]);
    down = (qweight [E, I, H/2], scale [E, I, H/32]); shared = ((gq, gs), (uq, us), (dq, ds)) or None.
    """
    x = x.float()
    out = torch.zeros_like(x)
    num_experts = gate_up[0].shape[0]
    for e in range(num_experts):
        token, slot = torch.nonzero(expert_ids == e, as_tuple=True)
        if token.numel() == 0:
            continue
        gu = expert_ref(*gate_up, e, x[token])
        g, u = gu.chunk(2, dim=-1)
        y = expert_ref(*down, e, F.silu(g) * u)
        out.index_add_(0, token, y * weights[token, slot].float().unsqueeze(-1))
    if shared is not None:
        out = out + swiglu_ref(*shared, x)
    return out
