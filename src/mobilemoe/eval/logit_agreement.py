"""How close one runtime's logits are to a reference's, position by position.

Shared by the export benchmarks (``benchmarks/export_llamacpp.py``, ``benchmarks/export_executorch.py``):
KL(softmax(ref) || softmax(got)), top-1 agreement, max abs difference, and the paired top-1 difference
of two runtimes on the same positions (numpy in, plain floats out); and the two ways those benchmarks
produce logits to compare: the exact float forward of a checkpoint and a runtime fed one token a step.
"""

from __future__ import annotations

import numpy as np


def position_stats(ref: np.ndarray, got: np.ndarray, chunk: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Per-position KL(softmax(ref) || softmax(got)) and top-1 agreement of [N, V] logits.

    In float64 row chunks: a whole 4096 x 128K float64 copy would need tens of GB."""
    kls, agree = [], []
    for i in range(0, len(ref), chunk):
        r, g = ref[i:i + chunk].astype(np.float64), got[i:i + chunk].astype(np.float64)
        lp = r - np.logaddexp.reduce(r, axis=-1, keepdims=True)
        lq = g - np.logaddexp.reduce(g, axis=-1, keepdims=True)
        kls.append((np.exp(lp) * (lp - lq)).sum(-1))
        agree.append(r.argmax(-1) == g.argmax(-1))
    return np.concatenate(kls), np.concatenate(agree)


def fidelity(refs: list[np.ndarray], gots: list[np.ndarray]) -> tuple[dict[str, float], np.ndarray]:
    """Mean KL and top-1 agreement over every sequence's positions, plus the per-position agreement
    vector (for the paired comparison with another runtime)."""
    stats = [position_stats(r, g) for r, g in zip(refs, gots)]
    kl = np.concatenate([k for k, _ in stats])
    agree = np.concatenate([a for _, a in stats])
    first16 = np.concatenate([a[:16] for _, a in stats])[:16]
    return ({"kl": float(kl.mean()), "top1": float(agree.mean()), "top1_16": float(first16.mean()),
             "positions": int(len(agree))}, agree)


def max_abs(refs: list[np.ndarray], gots: list[np.ndarray]) -> float:
    """Largest |ref - got| over every position and vocabulary entry (NaN if any logit is NaN)."""
    return float(max(np.abs(r.astype(np.float64) - g.astype(np.float64)).max() for r, g in zip(refs, gots)))


def paired_top1(agree: np.ndarray, base: np.ndarray, name: str = "native") -> dict[str, float]:
    """Top-1 agreement minus the baseline's on the same positions, in points, with its paired standard
    error (positions where both agree or both disagree carry no information about the difference)."""
    d = agree.astype(np.float64) - base.astype(np.float64)
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
    return {f"top1_minus_{name}_pts": round(100 * float(d.mean()), 2), "paired_se_pts": round(100 * se, 2)}


def reference_logits(ckpt, seqs: list[list[int]]) -> list[np.ndarray]:
    """``load_model(ckpt)``'s exact float forward of each sequence: float32 [T, V] per sequence."""
    import gc

    import torch

    from mobilemoe.checkpoint import load_model

    model = load_model(ckpt).eval()
    with torch.no_grad():
        out = [model(torch.tensor([s])).logits[0].float().numpy() for s in seqs]
    del model
    gc.collect()  # the caller's next runtime often needs the memory
    return out


def stepwise_logits(engine, ids: list[int]) -> np.ndarray:
    """A :class:`mobilemoe.runtime.Engine`'s logits [T, V] fed ``ids`` one token per step from a reset."""
    engine.reset()
    return np.stack([engine.decode(t).float().numpy() for t in ids])
