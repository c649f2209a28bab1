"""LR schedule shapes."""

from __future__ import annotations

import math

import pytest

from mobilemoe.train import lr_at


def _curve(schedule, total=100, warmup=10, **kw):
    return [lr_at(s, peak_lr=1.0, total_steps=total, warmup_steps=warmup, schedule=schedule, min_lr=0.1, **kw)
            for s in range(total)]


def test_warmup_is_linear_to_peak():
    lrs = _curve("cosine")
    assert lrs[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])


def test_cosine_monotone_to_min():
    lrs = _curve("cosine")
    post = lrs[10:]
    assert all(a >= b for a, b in zip(post, post[1:]))
    assert post[-1] == pytest.approx(0.1)
    mid = lrs[10 + 45]  # halfway through the decay: (peak + min) / 2
    assert mid == pytest.approx(0.55, abs=0.02)


def test_linear_decay():
    lrs = _curve("linear")
    post = lrs[10:]
    diffs = [a - b for a, b in zip(post, post[1:])]
    assert max(diffs) == pytest.approx(min(diffs))  # constant slope
    assert post[-1] == pytest.approx(0.1)


def test_wsd_holds_then_decays():
    lrs = _curve("wsd", decay_fraction=0.2)
    assert all(lr == 1.0 for lr in lrs[10:80])
    tail = lrs[80:]
    assert all(a > b for a, b in zip(tail, tail[1:]))
    assert tail[-1] == pytest.approx(0.1)


def test_constant_and_no_warmup():
    assert _curve("constant", warmup=0) == [1.0] * 100
    assert lr_at(0, peak_lr=2.0, total_steps=10, schedule="cosine") < 2.0 + 1e-12
    assert math.isfinite(lr_at(5, peak_lr=1.0, total_steps=1, warmup_steps=0))


def test_unknown_schedule():
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_at(0, peak_lr=1.0, total_steps=10, schedule="step")
