"""Sliding-window perplexity and bits per byte."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mobilemoe.eval import perplexity, perplexity_file
from mobilemoe.eval.perplexity import window_spans

TEXT = "The quick brown fox jumps over the lazy dog. The sky is blue and the grass is green. " * 3


def full_nll(lm, ids):
    with torch.no_grad():
        logp = F.log_softmax(lm.model(torch.tensor([ids])).logits.float(), -1)[0, :-1]
    return -float(logp.gather(-1, torch.tensor(ids[1:])[:, None]).sum())


@pytest.mark.parametrize("n, window, stride", [(10, 4, 4), (10, 4, 1), (10, 4, 3), (3, 8, 2), (100, 16, 5), (2, 2, 1)])
def test_windows_score_every_target_once(n, window, stride):
    scored = []
    spans = window_spans(n, window, stride)
    for begin, end, first in spans:
        assert end - begin <= window and begin + 1 <= first < end
        scored += list(range(first, end))
    assert scored == list(range(1, n))
    for (b0, _, _), (b1, _, _) in zip(spans, spans[1:]):
        assert b1 - b0 <= stride


def test_fits_in_one_window_equals_full_computation(tiny_lm):
    ids = [tiny_lm.prefix_token_id] + tiny_lm.encode(TEXT)
    assert len(ids) <= tiny_lm.max_length
    res = perplexity(tiny_lm, TEXT)  # default window = max_length: one forward
    nll = full_nll(tiny_lm, ids)
    assert res.windows == 1 and res.tokens == len(ids) - 1
    assert res.nll == pytest.approx(nll, rel=1e-5)
    assert res.loss == pytest.approx(nll / (len(ids) - 1), rel=1e-5)
    assert res.ppl == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-5)
    assert res.bytes == len(TEXT.encode())
    assert res.bits_per_byte == pytest.approx(nll / math.log(2) / len(TEXT.encode()), rel=1e-5)
    # any stride gives the same single window when the text fits
    assert perplexity(tiny_lm, TEXT, window=len(ids), stride=3).nll == pytest.approx(nll, rel=1e-5)


def test_sliding_window_equals_manual_windows(tiny_lm):
    ids = [tiny_lm.prefix_token_id] + tiny_lm.encode(TEXT)
    window, stride = 24, 8
    res = perplexity(tiny_lm, TEXT, window=window, stride=stride)
    want = 0.0
    for begin, end, first in window_spans(len(ids), window, stride):
        with torch.no_grad():
            logp = F.log_softmax(tiny_lm.model(torch.tensor([ids[begin:end]])).logits.float(), -1)[0]
        for t in range(first, end):
            want -= float(logp[t - begin - 1, ids[t]])
    assert res.tokens == len(ids) - 1 and res.windows > 1
    assert res.nll == pytest.approx(want, rel=1e-5)
    # a short context is (almost surely) worse than a long one, but each token is still counted once
    disjoint = perplexity(tiny_lm, TEXT, window=window)
    assert disjoint.tokens == res.tokens


def test_max_windows_and_file(tiny_lm, tmp_path):
    res = perplexity(tiny_lm, TEXT, window=16, max_windows=2)
    assert res.truncated and res.windows == 2 and res.tokens == 15 + 15
    assert 0 < res.bytes < len(TEXT.encode())
    path = tmp_path / "t.txt"
    path.write_text(TEXT)
    assert perplexity_file(tiny_lm, path).nll == pytest.approx(perplexity(tiny_lm, TEXT).nll)
    from mobilemoe.data.readers import DataError

    with pytest.raises(DataError, match="no such file"):
        perplexity_file(tiny_lm, tmp_path / "missing.txt")
