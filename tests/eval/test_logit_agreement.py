import numpy as np
import pytest

from mobilemoe.eval.logit_agreement import fidelity, max_abs, paired_top1, position_stats


def test_position_stats_match_a_direct_computation_whatever_the_chunk():
    rng = np.random.default_rng(0)
    ref, got = rng.normal(size=(37, 11)).astype(np.float32), rng.normal(size=(37, 11)).astype(np.float32)
    lp = ref - np.log(np.exp(ref.astype(np.float64)).sum(-1, keepdims=True))
    lq = got - np.log(np.exp(got.astype(np.float64)).sum(-1, keepdims=True))
    want = (np.exp(lp) * (lp - lq)).sum(-1)
    for chunk in (1, 5, 128):
        kl, agree = position_stats(ref, got, chunk=chunk)
        np.testing.assert_allclose(kl, want, rtol=1e-6)
        assert np.array_equal(agree, ref.argmax(-1) == got.argmax(-1))
    kl, agree = position_stats(ref, ref)
    assert np.allclose(kl, 0, atol=1e-12) and agree.all()


def test_fidelity_pools_sequences_and_first16_is_the_first_sequence():
    rng = np.random.default_rng(1)
    refs = [rng.normal(size=(20, 7)), rng.normal(size=(9, 7))]
    gots = [refs[0].copy(), -refs[1]]  # the first sequence agrees everywhere, the second nowhere
    numbers, agree = fidelity(refs, gots)
    assert numbers["positions"] == 29 and numbers["top1"] == pytest.approx(20 / 29)
    assert numbers["top1_16"] == 1.0 and agree[:20].all() and not agree[20:].any()
    assert max_abs(refs, gots) == pytest.approx(2 * np.abs(refs[1]).max())


def test_paired_top1_difference_and_standard_error():
    a = np.array([1, 1, 0, 1, 0, 1], bool)
    b = np.array([1, 0, 0, 1, 1, 1], bool)
    d = a.astype(float) - b.astype(float)
    out = paired_top1(a, b, name="x")
    assert out["top1_minus_x_pts"] == pytest.approx(100 * d.mean(), abs=0.01)
    assert out["paired_se_pts"] == pytest.approx(100 * d.std(ddof=1) / np.sqrt(6), abs=0.01)
    assert paired_top1(a, a)["paired_se_pts"] == 0.0  # identical choices: no uncertainty about the difference
