"""The accelerator side of training: device choice, activation checkpointing, ``torch.compile`` of
the decoder layers, fused AdamW, meta-device builds, peak memory.

Every knob defaults per device (``auto``): on CUDA the trainer uses bf16 autocast (from the
recipe's ``dtype``), fused AdamW and compiled decoder layers; on CPU none of the CUDA-only pieces.
``activation_checkpointing`` is explicit (it trades ~1/3 more compute for memory, a choice that
depends on the batch, not the device).

Activation checkpointing replaces each decoder layer's ``forward`` *on the instance* by a
non-reentrant :func:`torch.utils.checkpoint.checkpoint` of the original, so module names (and so
checkpoint tensor names) stay unchanged, and ``fully_shard`` applied afterwards still all-gathers the
layer's parameters before the recomputation (its pre-backward hook fires on the layer's outputs).
"""

from __future__ import annotations

import functools
import resource
import sys
from typing import Callable, Iterable

import torch
from torch import nn

from mobilemoe.errors import MobileMoEError

DEVICES = ("auto", "cpu", "cuda")
_MARK = "_mobilemoe_checkpointed"


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; ``cuda`` without a GPU is one clear error."""
    if name not in DEVICES:
        raise MobileMoEError(f"device: expected one of {DEVICES}, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise MobileMoEError(f"device 'cuda' was asked for but no CUDA device is available "
                             f"(torch {torch.__version__}, {build}); use --device cpu")
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(name)


def checkpoint_layers(layers: Iterable[nn.Module]) -> int:
    """Recompute each layer's activations in backward instead of storing them. Returns how many
    layers were (newly) wrapped; calling it twice is harmless."""
    from torch.utils.checkpoint import checkpoint

    n = 0
    for layer in layers:
        if getattr(layer, _MARK, False):
            continue
        inner = layer.forward

        @functools.wraps(inner)
        def forward(*args, _inner=inner, **kwargs):
            if not torch.is_grad_enabled():  # evaluation: nothing to save, nothing to recompute
                return _inner(*args, **kwargs)
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        layer.forward = forward
        setattr(layer, _MARK, True)
        n += 1
    return n


def is_checkpointed(layer: nn.Module) -> bool:
    return bool(getattr(layer, _MARK, False))


def want_compile(setting: bool | str, device: torch.device) -> bool:
    """``compile: auto`` compiles on CUDA only: on CPU inductor's build time dwarfs any gain at the
    sizes a CPU trains."""
    if setting == "auto":
        return device.type == "cuda"
    return bool(setting)


def compile_layers(layers: Iterable[nn.Module], backend: str | Callable = "inductor") -> int:
    """``torch.compile`` the static-shape parts of every decoder layer in place (``nn.Module.compile``:
    names unchanged): the norms, attention, a dense FFN, the shared expert. Returns the number of
    modules compiled.

    The routed-expert dispatch is left eager on purpose: its shapes depend on the data (tokens per
    expert), where dynamo would break the graph (and, inside a checkpointed layer, fall back to eager
    for the whole layer); it is already one grouped GEMM per projection."""
    n = 0
    for layer in layers:
        ff = getattr(layer, "feed_forward", None)
        parts = [getattr(layer, name, None) for name in ("input_layernorm", "self_attn", "post_attention_layernorm")]
        parts.append(getattr(ff, "shared_expert", None) if getattr(layer, "is_moe", False) else ff)
        for module in parts:
            if module is not None:
                module.compile(backend=backend, dynamic=False)
                n += 1
    return n


def fused_adamw_ok(params: list[torch.Tensor]) -> bool:
    """Fused AdamW: one kernel per step on CUDA; CPU keeps the default (foreach) implementation."""
    return bool(params) and all(p.device.type == "cuda" for p in params)


def build_on_meta(cfg) -> nn.Module:
    """A :class:`MobileMoEForCausalLM` on the meta device: shapes only, no memory. For counting a
    paper-scale model, or to be materialised with :func:`materialize` on the target device."""
    from mobilemoe.model import MobileMoEForCausalLM

    with torch.device("meta"):
        return MobileMoEForCausalLM(cfg)


def materialize(model: nn.Module, device: torch.device | str, seed: int = 0) -> nn.Module:
    """Allocate a meta-built model directly on ``device`` and initialise it (no CPU copy first)."""
    model.to_empty(device=device)
    with torch.device(device):
        model.init_buffers()
    model.reset_parameters(seed=seed)
    return model


def param_count(model: nn.Module) -> int:
    """Parameters (meta or real), each shared tensor once (tied embeddings)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated bytes on CUDA; on CPU the process's peak resident set (ru_maxrss)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
