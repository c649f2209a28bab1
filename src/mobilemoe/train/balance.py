"""MoE load balancing for training.

* :class:`AuxFreeBalancer`: the aux-loss-free scheme (DeepSeek-V3 style). Over one optimizer step
  it accumulates, per MoE layer, how many tokens chose each expert (from the router's
  ``expert_ids``); after the step it nudges the selection bias
  ``expert_bias += rate * sign(mean_count - count)``: overloaded experts go down, idle ones up.
  Under data parallelism the counts are all-reduced first, so every rank applies the same update.
* :func:`router_z_loss`: ``mean(logsumexp(router_logits)^2)`` (ST-MoE), averaged over layers.
* :func:`load_balancing_loss`: the Switch-Transformer auxiliary loss ``E * sum_e f_e * P_e``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

from mobilemoe.moe import MoEBlock, RouterOutput


def moe_blocks(model: nn.Module) -> list[MoEBlock]:
    """The MoE blocks of a model in layer order (works through DDP/FSDP wrappers)."""
    return [m for m in model.modules() if isinstance(m, MoEBlock)]


def expert_counts(router: Sequence[RouterOutput], num_experts: int, on_device: bool = False) -> torch.Tensor:
    """Tokens per expert per layer: int64 [L, E] (a token with top-k counts once for each of k).
    On CPU unless ``on_device`` (then where the router ran: no host sync on a GPU)."""
    if not router:
        return torch.zeros(0, num_experts, dtype=torch.long)
    counts = torch.stack([torch.bincount(r.expert_ids.reshape(-1), minlength=num_experts) for r in router])
    return counts if on_device else counts.cpu()


def router_z_loss(router: Sequence[RouterOutput]) -> torch.Tensor:
    """``mean over tokens of logsumexp(logits)^2``, averaged over MoE layers (0 without MoE)."""
    if not router:
        return torch.zeros(())
    losses = [torch.logsumexp(r.logits.float(), dim=-1).pow(2).mean() for r in router]
    return torch.stack(losses).mean()


def load_balancing_loss(router: Sequence[RouterOutput], router_type: str = "sigmoid") -> torch.Tensor:
    """Switch-style loss ``E * sum_e f_e * P_e`` averaged over layers, where ``f_e`` is the fraction
    of the N*k assignments routed to expert e and ``P_e`` the mean normalised router score of e.
    Equals 1 for perfectly uniform routing (0 without MoE)."""
    if not router:
        return torch.zeros(())
    losses = []
    for r in router:
        n_tokens, num_experts = r.logits.shape
        if router_type == "sigmoid":
            scores = torch.sigmoid(r.logits.float())
            scores = scores / scores.sum(-1, keepdim=True)
        else:
            scores = torch.softmax(r.logits.float(), dim=-1)
        counts = torch.bincount(r.expert_ids.reshape(-1), minlength=num_experts).float()
        f = counts / counts.sum().clamp_min(1.0)
        losses.append(num_experts * (f.detach() * scores.mean(0)).sum())
    return torch.stack(losses).mean()


class AuxFreeBalancer:
    """Accumulate expert counts over an optimizer step, then update each layer's ``expert_bias``."""

    def __init__(self, model: nn.Module, rate: float) -> None:
        self.blocks = moe_blocks(model)
        self.rate = float(rate)
        self.num_experts = self.blocks[0].cfg.num_local_experts if self.blocks else 0
        self.counts = torch.zeros(len(self.blocks), self.num_experts, dtype=torch.long)

    def observe(self, router: Sequence[RouterOutput]) -> None:
        """Add one micro-batch's routing decisions."""
        if self.blocks and router:
            counts = expert_counts(router, self.num_experts, on_device=True)
            if self.counts.device != counts.device:
                self.counts = self.counts.to(counts.device)
            self.counts += counts

    def reset(self) -> None:
        self.counts.zero_()

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """All-reduce the counts (if distributed), apply the bias update, reset. Returns the counts."""
        counts = self.counts.clone()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
                else torch.device("cpu")
            counts = counts.to(device)
            # ONE int64 all-reduce of every layer's counts per optimizer step (not per micro-batch):
            # exact, so every rank applies the same bias update as a single process would
            dist.all_reduce(counts)
        counts = counts.cpu()
        if self.rate > 0 and self.blocks:
            c = counts.double()
            delta = self.rate * torch.sign(c.mean(dim=1, keepdim=True) - c)
            for block, d in zip(self.blocks, delta):
                bias = block.expert_bias
                local = bias.to_local() if hasattr(bias, "to_local") else bias  # FSDP2 DTensor
                if local.numel() == d.numel():
                    local.add_(d.to(local.dtype).to(local.device))
                else:  # a sharded bias: update this rank's slice of the (replicated) delta
                    _add_sharded(bias, d)
        self.reset()
        return counts


def _add_sharded(bias, delta: torch.Tensor) -> None:
    """Add a full-size delta to a dim-0-sharded DTensor parameter (FSDP2)."""
    from torch.distributed.tensor import distribute_tensor

    sharded = distribute_tensor(delta.to(bias.dtype).to(bias.to_local().device), bias.device_mesh, bias.placements)
    bias.to_local().add_(sharded.to_local())


def count_spread(counts: torch.Tensor) -> float:
    """(max - min) / mean of per-expert counts, averaged over layers: 0 when perfectly balanced."""
    c = counts.double()
    return float(((c.max(1).values - c.min(1).values) / c.mean(1).clamp_min(1e-9)).mean())
