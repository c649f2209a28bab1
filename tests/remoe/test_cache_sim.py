"""The cache simulator on hand-made traces with hit counts worked out by hand."""

import numpy as np
import pytest

from mobilemoe.remoe.cache_sim import analyze, eor, plot_heatmap, simulate_groups, simulate_layer, simulate_shared
from mobilemoe.remoe.device import PROFILES, StorageProfile, miss_profile, projected_tpot_ms


def test_lru_vs_belady_classic_sequence():
    # K = 1, C = 3: the textbook reference string
    seq = [7, 0, 1, 2, 0, 3, 0, 4, 2, 3, 0, 3, 2, 1, 2, 0, 1, 7, 0, 1]
    ids = np.array(seq)[:, None]
    lru = simulate_layer(ids, 3, "lru")
    opt = simulate_layer(ids, 3, "belady")
    assert lru.misses == 12 and lru.hits == 8
    assert opt.misses == 9 and opt.hits == 11
    assert opt.compulsory_misses == lru.compulsory_misses == 6  # distinct pages 7,0,1,2,3,4


def test_lfu_keeps_frequent():
    # C = 2: 1 is used 3 times, then 2, 3 alternate; LFU keeps 1, LRU evicts it
    seq = [1, 1, 1, 2, 3, 1]
    lfu = simulate_layer(np.array(seq)[:, None], 2, "lfu")
    lru = simulate_layer(np.array(seq)[:, None], 2, "lru")
    # LFU: miss 1, hit, hit, miss 2, miss 3 (evict 2, freq 1 < 3), hit 1  -> 3 hits
    assert (lfu.hits, lfu.misses) == (3, 3)
    # LRU: miss, hit, hit, miss 2, miss 3 (evicts 1), miss 1 -> 2 hits
    assert (lru.hits, lru.misses) == (2, 4)


def test_top_k_groups_and_eor():
    # K = 2, C = K: hits at t equal |E_t ∩ E_{t-1}| (Proposition 3.1 holds with equality for LRU)
    ids = np.array([[0, 1], [1, 2], [1, 2], [3, 4], [4, 0]])
    st = simulate_layer(ids, 2, "lru")
    overlaps = [1, 2, 0, 1]
    assert st.hits == sum(overlaps) and st.misses == 10 - 4
    assert eor(ids) == pytest.approx(np.mean(overlaps) / 2)
    rep = analyze(ids[None], 2)
    assert rep.bound_misses_per_token == pytest.approx(2 * (1 - rep.eor))
    # at C = K every policy is forced: the whole cache is the current token's set
    assert rep.policies["lru"]["hits"] == rep.policies["belady"]["hits"] == rep.policies["lfu"]["hits"] == 4
    # sequence starts are excluded from EOR
    assert eor(ids, seq_starts=[0, 3]) == pytest.approx((1 + 2 + 1) / 3 / 2)


def test_token_experts_are_never_evicted_and_capacity_checked():
    ids = np.array([[0, 1], [2, 3], [0, 2]])
    st = simulate_layer(ids, 3, "lru")
    # t0: miss 0,1 ; t1: miss 2 (cache 0,1,2), miss 3 evicts LRU 0 -> {1,2,3}; t2: miss 0 (evict 1), hit 2
    assert (st.hits, st.misses) == (1, 5)
    with pytest.raises(ValueError):
        simulate_layer(ids, 1, "lru")
    with pytest.raises(ValueError):
        simulate_groups([(0,)], 1, "fifo")


def test_shared_budget_and_bytes():
    ids = np.array([[[0], [0], [1]], [[0], [0], [0]]])  # L=2, N=3, K=1
    per = analyze(ids, 1, ("lru",), expert_bytes=100)
    assert per.policies["lru"]["misses"] == 2 + 1
    assert per.policies["lru"]["bytes_per_token"] == pytest.approx(3 * 100 / 3)
    sh = simulate_shared(ids, 2, "lru", 100)  # keys (layer, expert): (0,0),(1,0) fit; (0,1) evicts one
    assert (sh.hits, sh.misses) == (3, 3)


def test_device_model_and_heatmap(tmp_path):
    prof = StorageProfile("x", bandwidth_gbps=1.0, latency_us=100.0)
    # 2 layers: 1 miss/token (always), 0 misses; 1e6-byte experts -> 0.1 ms + 1 ms
    assert projected_tpot_ms([1.0, 0.0], 10**6, prof, compute_ms=5.0) == pytest.approx(6.1)
    ids = np.array([[[0, 1], [0, 1], [2, 3]]])
    means, probs = miss_profile(ids, 2)
    assert means == [pytest.approx(4 / 3)] and probs == [pytest.approx(2 / 3)]
    assert set(PROFILES) >= {"phone-ufs4", "jetson-nvme"}
    out = plot_heatmap(ids, ids, 4, str(tmp_path / "h.png"))
    assert (tmp_path / "h.png").stat().st_size > 0 and out.endswith("h.png")
