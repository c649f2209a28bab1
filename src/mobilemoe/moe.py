"""The MoE feed-forward block: router, stacked routed experts, and the always-on shared expert.

Routing (MobileMoE, ``router_type="sigmoid"``), per token with hidden state h:
    s       = sigmoid(h @ router.T)                      (fp32)
    chosen  = top-k of (s + expert_bias), ties to the lower index   (bias steers selection only)
    weights = s[chosen] / sum(s[chosen]) * routed_scaling_factor    (renormalised if norm_topk_prob)
    out     = sum_j weights_j * expert_{chosen_j}(h) + shared_expert(h)

``router_type="softmax"`` (Mixtral/Qwen style) uses p = softmax(logits) in place of s.

Dispatch groups tokens by expert: one stable argsort of the (token, slot) assignments, then every
expert runs over its contiguous slice of tokens (the mlx-lm ``switch_layers`` idea). With
``torch._grouped_mm`` that is one grouped GEMM for all experts' gate/up and one for their down
projections (forward and backward), so the cost does not grow with a Python loop over experts; where
it cannot run (old torch, unaligned widths, dtypes it refuses) a loop with one matmul per used
expert computes the same thing. There is never a Python loop over tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mobilemoe.config import MobileMoEConfig


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``: the shared expert and the dense FFN."""

    def __init__(self, hidden: int, width: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.up_proj = nn.Linear(hidden, width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class StackedExperts(nn.Module):
    """E SwiGLU experts stored as two stacked tensors, laid out as in the released checkpoints:
    ``gate_up_proj`` [E, H, 2I] (gate = first I columns, up = second I) and ``down_proj`` [E, I, H],
    so expert e computes ``(silu(x @ Wg) * (x @ Wu)) @ Wd`` with ``y = x @ W[e]``."""

    def __init__(self, num_experts: int, hidden: int, width: int) -> None:
        super().__init__()
        self.width = width
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, hidden, 2 * width))
        self.down_proj = nn.Parameter(torch.empty(num_experts, width, hidden))

    def expert_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up [E, H, 2I], down [E, I, H]) as the forward uses them (QAT fake-quantizes here)."""
        return self.gate_up_proj, self.down_proj

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        """Hook on each expert matmul's input (identity; QAT fake-quantizes activations here)."""
        return x

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate_up, down = self.expert_weights()
        return self._swiglu(x, gate_up[e], down[e])

    def _swiglu(self, x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        gate, up = (self.activation(x) @ gate_up).split(self.width, dim=-1)
        return self.activation(F.silu(gate) * up) @ down

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, H]; expert_ids, weights [N, k]. Returns sum_j weights[:, j] * expert_{ids[:, j]}(x)."""
        n_tokens, k = expert_ids.shape
        flat_ids = expert_ids.reshape(-1)
        order = torch.argsort(flat_ids, stable=True)  # group the N*k assignments by expert
        token_of = order // k
        counts = torch.bincount(flat_ids, minlength=self.gate_up_proj.shape[0])
        # index_select, not x[token_of]: its backward is an index_add, while advanced indexing's
        # backward is an accumulating index_put that sorts and runs ~5x slower on CPU.
        x_sorted = x.index_select(0, token_of)
        w_sorted = weights.reshape(-1)[order].unsqueeze(-1).to(x.dtype)
        gate_up, down = self.expert_weights()  # once per forward, whichever experts are used
        if self._grouped_ok(x_sorted):
            y_sorted = self._grouped_forward(x_sorted, counts, gate_up, down)
        else:
            y_sorted = self._looped_forward(x_sorted, counts.tolist(), gate_up, down)
        return torch.zeros_like(x).index_add_(0, token_of, y_sorted * w_sorted)

    def _grouped_ok(self, x_sorted: torch.Tensor) -> bool:
        # _grouped_mm needs 16-byte aligned row strides and one dtype for both operands; autocast
        # does not cover it, so under autocast the operands are cast by hand in _grouped_forward.
        if not _HAS_GROUPED_MM or x_sorted.shape[0] == 0:
            return False
        dtype = _compute_dtype(x_sorted)
        if dtype not in (torch.float32, torch.bfloat16):
            return False
        elems = 16 // dtype.itemsize
        hidden, width = self.gate_up_proj.shape[1], self.width
        return hidden % elems == 0 and width % elems == 0

    def _grouped_forward(self, x_sorted: torch.Tensor, counts: torch.Tensor, gate_up: torch.Tensor,
                         down: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(x_sorted)
        rows, offs, dest = _group_layout(counts, x_sorted.shape[0], group_align_rows(x_sorted, dtype))
        with torch.autocast(device_type=x_sorted.device.type, enabled=False):
            xs = x_sorted.to(dtype)
            if dest is not None:  # each group starts on an aligned row; padding rows are zero
                xs = xs.new_zeros(rows, xs.shape[1]).index_copy(0, dest, xs)
            xs = self.activation(xs)
            g_u = torch._grouped_mm(xs, gate_up.to(dtype), offs=offs)
            gate, up = g_u.split(self.width, dim=-1)
            hidden = self.activation((F.silu(gate) * up).contiguous())
            y = torch._grouped_mm(hidden, down.to(dtype), offs=offs)
            return y if dest is None else y.index_select(0, dest)

    def _looped_forward(self, x_sorted: torch.Tensor, counts: list[int], gate_up: torch.Tensor,
                        down: torch.Tensor) -> torch.Tensor:
        outputs = []
        start = 0
        for e, count in enumerate(counts):
            if count == 0:
                continue  # an expert no token chose is never touched
            end = start + count
            outputs.append(self._swiglu(x_sorted[start:end], gate_up[e], down[e]))
            start = end
        return torch.cat(outputs, dim=0)


_HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")


def group_align_rows(x: torch.Tensor, dtype: torch.dtype) -> int:
    """Rows each expert group of a grouped GEMM must start on: on CUDA the weight-gradient GEMM of
    the backward splits along tokens, and each group's start must be 16-byte aligned there."""
    return 16 // dtype.itemsize if x.is_cuda else 1


def _group_layout(counts: torch.Tensor, n_rows: int, align: int):
    """(buffer rows, int32 group end offsets, destination row of each sorted row or None).

    With ``align`` > 1 every group is padded to a multiple of ``align`` rows; the buffer has the fixed
    bound ``n_rows + E * (align - 1)`` rows so no count has to reach the host.
    """
    if align == 1:
        return n_rows, counts.cumsum(0).to(torch.int32), None
    padded = (counts + align - 1) // align * align
    offs = padded.cumsum(0)
    group = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts,
                                    output_size=n_rows)
    rank = torch.arange(n_rows, device=counts.device) - (counts.cumsum(0) - counts)[group]
    dest = (offs - padded)[group] + rank
    return n_rows + counts.numel() * (align - 1), offs.to(torch.int32), dest


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on ``x`` runs in: the autocast dtype when autocast is on, else x's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


@dataclass
class RouterOutput:
    logits: torch.Tensor  # [N, E] fp32, before sigmoid/softmax
    expert_ids: torch.Tensor  # [N, k] chosen experts, best first
    weights: torch.Tensor  # [N, k] fp32 combine weights (incl. routed_scaling_factor)


def select_topk(selection: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [..., k] of the k largest entries of each row, best first, ties to the lower index."""
    # A stable descending sort keeps equal scores in index order.
    return torch.sort(selection, dim=-1, descending=True, stable=True).indices[..., :k]


def select_topk_static(selection: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`select_topk` from compares and sums only: ExecuTorch has no sort kernel, and its topk
    (like torch.topk) leaves the order of ties unspecified. Costs [..., E, E] compares per row."""
    idx = torch.arange(selection.shape[-1], device=selection.device)
    mine, rival = selection.unsqueeze(-1), selection.unsqueeze(-2)  # [..., E, 1], [..., 1, E]
    # rival j ranks before expert e when larger, or equal with a lower index
    before = (rival > mine) | ((rival == mine) & (idx[None, :] < idx[:, None]))
    rank = before.sum(-1)  # [..., E]: a permutation of 0..E-1 per row
    slot = (rank.unsqueeze(-1) == torch.arange(k, device=selection.device)).long()  # [..., E, k]
    return (slot * idx[:, None]).sum(-2)


def route(logits: torch.Tensor, expert_bias: torch.Tensor, cfg: MobileMoEConfig,
          select=select_topk) -> RouterOutput:
    """Choose top-k experts per token from fp32 router logits (see module docstring).
    ``select`` is :func:`select_topk` or an equal, export-friendly :func:`select_topk_static`."""
    if cfg.router_type == "sigmoid":
        scores = torch.sigmoid(logits)
    else:
        scores = torch.softmax(logits, dim=-1)
    expert_ids = select(scores + expert_bias.float(), cfg.num_experts_per_tok)
    weights = scores.gather(-1, expert_ids)
    if cfg.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    weights = weights * cfg.routed_scaling_factor
    return RouterOutput(logits=logits, expert_ids=expert_ids, weights=weights)


class MoEBlock(nn.Module):
    """Router + stacked routed experts + optional shared expert (module names match checkpoints)."""

    def __init__(self, cfg: MobileMoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        E, H = cfg.num_local_experts, cfg.hidden_size
        self.router = nn.Linear(H, E, bias=False)
        # Selection-only bias, updated by the aux-loss-free balancer, never by gradients. A frozen
        # Parameter (not a buffer) so it is counted, cast and saved like every other tensor.
        self.expert_bias = nn.Parameter(torch.zeros(E), requires_grad=False)
        self.experts = StackedExperts(E, H, cfg.intermediate_size)
        self.shared_expert = SwiGLU(H, cfg.intermediate_size_mlp) if cfg.num_shared_experts else None
        self.select = select_topk  # the ExecuTorch export swaps in select_topk_static

    def router_logits(self, h: torch.Tensor) -> torch.Tensor:
        """fp32 router logits for flattened hidden states [N, H] (also under bf16 autocast, which would
        otherwise run this linear in bf16 and blur the top-k)."""
        with torch.autocast(h.device.type, enabled=False):
            return F.linear(h.float(), self.router.weight.float())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterOutput]:
        shape = x.shape
        h = x.reshape(-1, shape[-1])
        routing = route(self.router_logits(h), self.expert_bias, self.cfg, self.select)
        out = self.experts(h, routing.expert_ids, routing.weights)
        if self.shared_expert is not None:
            out = out + self.shared_expert(h)
        return out.reshape(shape), routing
