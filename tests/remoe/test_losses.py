"""Each ReMoE loss against a direct per-token loop written from the paper's definitions."""

import math

import pytest
import torch

from mobilemoe.remoe.losses import (LayerRouting, LossWeights, lag_loss, remoe_loss, reuse_loss, reuse_rate,
                                    router_probs, smooth_loss, trust_loss, working_set_loss)


def _kl(p, q):
    return sum(float(p[i]) * (math.log(max(float(p[i]), 1e-9)) - math.log(max(float(q[i]), 1e-9)))
               for i in range(len(p)))


def _sym(p, q):
    return _kl(p, q) + _kl(q, p)


def _setup(B=2, T=20, E=6, K=2, scoring="softmax", seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, E, generator=g) * 2
    ref = logits + 0.3 * torch.randn(B, T, E, generator=g)
    ids = torch.softmax(logits, -1).topk(K, -1).indices
    return logits, ref, ids


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_router_probs(scoring):
    logits, _, _ = _setup()
    P = router_probs(logits, scoring)
    assert torch.allclose(P.sum(-1), torch.ones(P.shape[:-1]))
    if scoring == "sigmoid":
        s = torch.sigmoid(logits[0, 3])
        assert torch.allclose(P[0, 3], s / s.sum())
    with pytest.raises(ValueError):
        router_probs(logits, "relu")


def test_reuse_matches_per_token():
    logits, _, ids = _setup()
    P = router_probs(logits, "softmax")
    B, T, _ = P.shape
    K = ids.shape[-1]
    ms = [sum(float(P[b, t, k]) for k in ids[b, t - 1].tolist()) / K for b in range(B) for t in range(1, T)]
    rho = sum(ms) / len(ms)
    assert float(reuse_rate(P, ids)) == pytest.approx(rho, rel=1e-6)
    assert float(reuse_loss(P, ids)) == pytest.approx(-math.log(rho + 1e-8), rel=1e-6)


def test_reuse_ids_are_stopgrad():
    logits, _, ids = _setup()
    logits.requires_grad_(True)
    P = router_probs(logits, "softmax")
    reuse_loss(P, ids).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    # the last token's distribution is never a "previous" set target: only its P enters
    assert logits.grad[:, 0].abs().sum() == 0  # t = 0 has no previous token


def test_smooth_and_lag_match_per_token():
    logits, _, _ = _setup(T=20)
    P = router_probs(logits, "softmax")
    B, T, _ = P.shape
    ref = [_sym(P[b, t], P[b, t - 1]) for b in range(B) for t in range(1, T)]
    assert float(smooth_loss(P)) == pytest.approx(sum(ref) / len(ref), rel=1e-5)
    per_lag = []
    for d in (1, 2, 4, 8, 16):
        v = [_sym(P[b, t], P[b, t - d]) for b in range(B) for t in range(d, T)]
        per_lag.append(sum(v) / len(v))
    assert float(lag_loss(P)) == pytest.approx(sum(per_lag) / len(per_lag), rel=1e-5)
    # lags >= T are skipped
    assert float(lag_loss(P[:, :5], (1, 8))) == pytest.approx(float(smooth_loss(P[:, :5])), rel=1e-6)


def test_working_set_matches_per_window():
    logits, _, _ = _setup(T=19)
    P = router_probs(logits, "sigmoid")
    B, T, E = P.shape
    W = 4
    ents = []
    for b in range(B):
        for s in range(0, T - W + 1, W):
            m = [sum(float(P[b, t, e]) for t in range(s, s + W)) / W for e in range(E)]
            ents.append(-sum(x * math.log(x) for x in m))
    assert float(working_set_loss(P, W)) == pytest.approx(sum(ents) / len(ents), rel=1e-5)


def test_trust_matches_per_token_and_stops_grad():
    logits, ref, _ = _setup()
    ref = ref.clone().requires_grad_(True)
    P = router_probs(logits, "softmax")
    Pr = router_probs(ref, "softmax")
    B, T, _ = P.shape
    v = [_kl(P[b, t], Pr.detach()[b, t]) for b in range(B) for t in range(T)]
    loss = trust_loss(P, Pr)
    assert float(loss) == pytest.approx(sum(v) / len(v), rel=1e-5)
    assert not loss.requires_grad  # the reference receives no gradient


def test_total_objective():
    logits, ref, ids = _setup()
    w = LossWeights(l_reuse=0.7, l_smooth=0.3, l_lag=0.2, l_ws=0.1, l_kl=2.0, warm_steps=10, window=4)
    layers = [LayerRouting(logits, ref, ids, "softmax"), LayerRouting(logits * 0.5, ref, ids, "softmax")]
    ce = torch.tensor(1.25)
    for step, a in ((0, 0.0), (5, 0.5), (30, 1.0)):
        out = remoe_loss(ce, layers, w, step)
        parts = []
        for lr in layers:
            P, Pr = router_probs(lr.logits, "softmax"), router_probs(lr.ref_logits, "softmax")
            parts.append((reuse_loss(P, ids), smooth_loss(P), lag_loss(P), working_set_loss(P, 4), trust_loss(P, Pr)))
        m = [sum(float(p[i]) for p in parts) / 2 for i in range(5)]
        loc = 0.7 * m[0] + 0.3 * m[1] + 0.2 * m[2] + 0.1 * m[3]
        assert out.parts["alpha"] == a
        assert float(out.total) == pytest.approx(1.25 + 2.0 * m[4] + a * loc, rel=1e-5)
