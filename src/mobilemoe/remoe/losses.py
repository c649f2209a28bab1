"""ReMoE losses (ICML 2026, arXiv 2605.27081), written over a whole batch at once.

Shapes: ``P`` [B, T, E] router distributions (rows sum to 1), ``ids`` [B, T, K] the chosen top-K
experts. Time runs along T *within* each sequence; a token never looks across a batch row.

* reuse:  m_t = (1/K) sum_{k in stopgrad(E_{t-1})} P_t[k];  rho = mean_t m_t;  L = -log(rho + 1e-8)
* smooth: mean_t SymKL(P_t, P_{t-1})
* lag:    mean over d in ``lags`` (d < T) of mean_t SymKL(P_t, P_{t-d})
* ws:     mean over non-overlapping windows of W steps of H(mean_{t in window} P_t)
* trust:  mean_t KL(P_t || stopgrad(P_t^ref))

SymKL(P, Q) = KL(P||Q) + KL(Q||P). Per-layer losses are averaged over MoE layers by
:func:`remoe_loss`. Probabilities are clamped at ``PROB_EPS`` inside logarithms.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch

PROB_EPS = 1e-9
REUSE_EPS = 1e-8
DEFAULT_LAGS = (1, 2, 4, 8, 16)


def router_probs(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    """P_t from fp32 logits: softmax, or the family's sigmoid scores normalised to sum 1."""
    logits = logits.float()
    if scoring == "softmax":
        return torch.softmax(logits, dim=-1)
    if scoring == "sigmoid":
        s = torch.sigmoid(logits)
        return s / s.sum(dim=-1, keepdim=True)
    raise ValueError(f"unknown scoring function {scoring!r} (softmax or sigmoid)")


def _log(p: torch.Tensor) -> torch.Tensor:
    return p.clamp_min(PROB_EPS).log()


def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last dim."""
    return (p * (_log(p) - _log(q))).sum(-1)


def sym_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return kl(p, q) + kl(q, p)


def reuse_rate(P: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """rho = mean over t >= 1 of m_t (a differentiable scalar; ids carry no gradient)."""
    K = ids.shape[-1]
    prev = ids[:, :-1].detach()
    m = P[:, 1:].gather(-1, prev).sum(-1) / K  # [B, T-1]
    return m.mean()


def reuse_loss(P: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return -torch.log(reuse_rate(P, ids) + REUSE_EPS)


def smooth_loss(P: torch.Tensor) -> torch.Tensor:
    return sym_kl(P[:, 1:], P[:, :-1]).mean()


def lag_loss(P: torch.Tensor, lags: Sequence[int] = DEFAULT_LAGS) -> torch.Tensor:
    T = P.shape[1]
    terms = [sym_kl(P[:, d:], P[:, :-d]).mean() for d in lags if 0 < d < T]
    return torch.stack(terms).mean() if terms else P.sum() * 0.0


def working_set_loss(P: torch.Tensor, window: int = 8) -> torch.Tensor:
    """Entropy of the window-mean distribution, averaged over full windows (a short tail is dropped)."""
    B, T, E = P.shape
    w = max(1, min(window, T))
    n = T // w
    mean = P[:, : n * w].reshape(B, n, w, E).mean(2)
    return -(mean * _log(mean)).sum(-1).mean()


def trust_loss(P: torch.Tensor, P_ref: torch.Tensor) -> torch.Tensor:
    return kl(P, P_ref.detach()).mean()


@dataclass
class LossWeights:
    """Every weight of the ReMoE objective: L_CE + l_kl*L_trust + a_t*(l_reuse*L_reuse + l_smooth*L_smooth
    + l_lag*L_lag + l_ws*L_ws), a_t = min(1, step / warm_steps)."""

    l_reuse: float = 1.0
    l_smooth: float = 0.1
    l_lag: float = 0.05
    l_ws: float = 0.05
    l_kl: float = 1.0
    l_ce: float = 1.0
    warm_steps: int = 200  # T_warm for a_t
    lags: tuple[int, ...] = DEFAULT_LAGS
    window: int = 8

    def alpha(self, step: int) -> float:
        return 1.0 if self.warm_steps <= 0 else min(1.0, step / self.warm_steps)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LayerRouting:
    """One MoE layer over a batch: trainable logits, reference logits, chosen experts."""

    logits: torch.Tensor  # [B, T, E] fp32 (with grad)
    ref_logits: torch.Tensor  # [B, T, E] fp32 from the frozen original router
    expert_ids: torch.Tensor  # [B, T, K]
    scoring: str = "softmax"


@dataclass
class LossTerms:
    total: torch.Tensor
    parts: dict[str, float] = field(default_factory=dict)


def remoe_loss(ce: torch.Tensor, layers: Sequence[LayerRouting], w: LossWeights, step: int) -> LossTerms:
    """The total ReMoE objective; per-layer terms are averaged over layers."""
    names = ("reuse", "smooth", "lag", "ws", "trust")
    acc = {n: [] for n in names}
    rho = []
    for lr in layers:
        P = router_probs(lr.logits, lr.scoring)
        P_ref = router_probs(lr.ref_logits, lr.scoring)
        r = reuse_rate(P, lr.expert_ids)
        rho.append(r.detach())
        acc["reuse"].append(-torch.log(r + REUSE_EPS))
        acc["smooth"].append(smooth_loss(P) if w.l_smooth else P.sum() * 0)
        acc["lag"].append(lag_loss(P, w.lags) if w.l_lag else P.sum() * 0)
        acc["ws"].append(working_set_loss(P, w.window) if w.l_ws else P.sum() * 0)
        acc["trust"].append(trust_loss(P, P_ref))
    m = {n: torch.stack(v).mean() for n, v in acc.items()}
    a = w.alpha(step)
    loc = w.l_reuse * m["reuse"] + w.l_smooth * m["smooth"] + w.l_lag * m["lag"] + w.l_ws * m["ws"]
    total = w.l_ce * ce + w.l_kl * m["trust"] + a * loc
    parts = {"ce": float(ce.detach()), "loc": float(loc.detach()), "alpha": a,
             "rho": float(torch.stack(rho).mean()) if rho else 0.0}
    parts.update({n: float(v.detach()) for n, v in m.items()})
    parts["total"] = float(total.detach())
    return LossTerms(total, parts)
