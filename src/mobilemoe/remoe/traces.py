"""Routing traces: per-layer chosen expert ids for a workload, stored compactly.

File (``.npz``): ``ids`` uint8/int16 [L, N, K] (the K experts of every token, every MoE layer),
``seq_starts`` int64 (the first token of each sequence), ``phase`` uint8 [N] (0 prefill/prompt,
1 generated) and ``meta``: a JSON string (family, num_experts, top_k, moe layers, model, workload).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from mobilemoe.errors import MobileMoEError
from mobilemoe.remoe.adapters import Adapter


@dataclass
class Trace:
    ids: np.ndarray  # [L, N, K]
    seq_starts: np.ndarray
    phase: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return int(self.ids.shape[1])

    def save(self, path: str | Path) -> Path:
        from mobilemoe.utils import atomic_path

        E = int(self.meta.get("num_experts", int(self.ids.max()) + 1))
        dt = np.uint8 if E <= 256 else np.int16 if E <= 32767 else np.int32
        path = Path(path)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez_compressed(fh, ids=self.ids.astype(dt), seq_starts=self.seq_starts.astype(np.int64),
                                    phase=self.phase.astype(np.uint8), meta=np.array(json.dumps(self.meta)))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Trace":
        try:
            with np.load(path, allow_pickle=False) as z:
                return cls(z["ids"].astype(np.int64), z["seq_starts"], z["phase"], json.loads(str(z["meta"])))
        except (OSError, KeyError, ValueError) as exc:
            raise MobileMoEError(f"{path}: not a routing trace ({exc})") from None


def _meta(adapter: Adapter, workload: str) -> dict[str, Any]:
    return {"family": adapter.family, "num_experts": adapter.num_experts, "top_k": adapter.top_k,
            "moe_layers": adapter.num_layers, "model": str(adapter.path or ""), "workload": workload}


@torch.no_grad()
def trace_sequences(adapter: Adapter, seqs: Sequence[torch.Tensor], workload: str = "prefill",
                    phases: Sequence[np.ndarray] | None = None) -> Trace:
    """Teacher-forced traces: one forward per sequence ([1, T] or [T] ids), concatenated."""
    parts, starts, ph = [], [], []
    n = 0
    for i, s in enumerate(seqs):
        s = torch.as_tensor(s).reshape(1, -1)
        fwd = adapter.forward(s, with_ref=False)
        parts.append(np.stack([lr.expert_ids[0].cpu().numpy() for lr in fwd.layers]))
        starts.append(n)
        ph.append(np.zeros(s.shape[1], np.uint8) if phases is None else np.asarray(phases[i], np.uint8))
        n += s.shape[1]
    if not parts:
        raise MobileMoEError("empty workload: no sequences to trace")
    return Trace(np.concatenate(parts, axis=1), np.asarray(starts), np.concatenate(ph), _meta(adapter, workload))


@torch.no_grad()
def greedy_continue(adapter: Adapter, prompt: torch.Tensor, max_new: int) -> torch.Tensor:
    """Greedy continuation (MobileMoE: with its KV cache; transformers: generate())."""
    from mobilemoe.model import MobileMoEForCausalLM

    prompt = torch.as_tensor(prompt).reshape(1, -1)
    m = adapter.model
    if isinstance(m, MobileMoEForCausalLM):
        cache = m.new_cache(1, prompt.shape[1] + max_new)
        logits = m(prompt, 0, cache, last_only=True).logits
        out = [prompt]
        pos = prompt.shape[1]
        for _ in range(max_new):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            out.append(nxt)
            logits = m(nxt, pos, cache).logits
            pos += 1
        return torch.cat(out, dim=1)
    return m.generate(prompt, max_new_tokens=max_new, do_sample=False, min_new_tokens=max_new,
                      attention_mask=torch.ones_like(prompt))


def trace_generation(adapter: Adapter, prompts: Sequence[torch.Tensor], max_new: int = 32) -> Trace:
    """Prompts are prefilled, then ``max_new`` tokens generated greedily; phase marks the generated ones.
    The routing of the whole sequence is then recorded in one causal forward (identical to the
    token-by-token routing up to floating-point reassociation)."""
    seqs, phases = [], []
    for p in prompts:
        full = greedy_continue(adapter, p, max_new)
        P = torch.as_tensor(p).numel()
        seqs.append(full)
        phases.append(np.r_[np.zeros(P, np.uint8), np.ones(full.shape[1] - P, np.uint8)])
    return trace_sequences(adapter, seqs, "generation", phases)
