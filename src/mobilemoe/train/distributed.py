"""Process-group setup and model wrapping for multi-process training (``torchrun``).

``torchrun --nproc-per-node N -m mobilemoe.cli train ...`` sets ``RANK``/``WORLD_SIZE``/
``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``; :func:`init_distributed` reads them. CPU runs use the
``gloo`` backend, CUDA runs ``nccl``. A single process (no env vars) is world size 1 and nothing is
wrapped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from mobilemoe.errors import MobileMoEError

STRATEGIES = ("none", "ddp", "fsdp")


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def current() -> DistInfo:
    """Rank/world of an already initialised process group (or the single-process defaults)."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
        device = torch.device("cuda", local) if torch.cuda.is_available() and dist.get_backend() == "nccl" \
            else torch.device("cpu")
        return DistInfo(rank, world, local, device)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return DistInfo(device=device)


def init_distributed(backend: str | None = None, device: str = "auto") -> DistInfo:
    """Initialise the default process group from torchrun's env vars when ``WORLD_SIZE > 1``.
    ``device`` (auto | cpu | cuda) picks the backend: nccl for CUDA, gloo for CPU."""
    from mobilemoe.train.gpu import resolve_device

    on = resolve_device(device)  # "cuda" without a GPU fails here, before any process group exists
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if backend is None:
            backend = "nccl" if on.type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return current()


def wrap_model(model: nn.Module, strategy: str, info: DistInfo) -> nn.Module:
    """Wrap for data parallelism: DDP, or FSDP2 (``fully_shard`` per decoder layer, then the root).

    Returns the module to call for forward/backward; parameters stay those of ``model`` (DDP) or
    become sharded DTensors in place (FSDP2).
    """
    if strategy not in STRATEGIES:
        raise MobileMoEError(f"unknown distributed strategy {strategy!r}; choose one of {STRATEGIES}")
    if not info.enabled or strategy == "none":
        if info.enabled:
            raise MobileMoEError("running under several processes needs strategy 'ddp' or 'fsdp', not 'none'")
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [info.device.index] if info.device.type == "cuda" else None
        return DDP(model, device_ids=ids)
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (no-op in a single process); returns ``t``."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t
