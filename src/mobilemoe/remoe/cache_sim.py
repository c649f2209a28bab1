"""Expert-cache simulation over routing traces: LRU, LFU and Belady-optimal, per layer or shared.

A trace for one layer is ``ids`` [N, K]: token t needs the K experts E_t, all resident at once (so a
token's own experts are never evicted while it is served). A request is a hit when the expert is
already cached; otherwise it is fetched (a miss) and, when the cache is full, a victim is evicted:

* ``lru``: least recently used;  ``lfu``: fewest uses so far (ties: least recent);
* ``belady``: the one whose next use is farthest in the future (never used again first) -- optimal
  for a fixed capacity (Belady's MIN).

With C = K and LRU the cache after token t is exactly E_t, so LRU's hit rate equals the Expert Overlap
Ratio and the misses per token equal K(1 - EOR) (Proposition 3.1). With ``shared=True`` one cache of
``capacity`` (layer, expert) slots serves all layers, visited token-major then layer order.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Hashable, Sequence

import numpy as np

POLICIES = ("lru", "lfu", "belady")


@dataclass
class CacheStats:
    policy: str
    capacity: int
    requests: int
    hits: int
    misses: int
    compulsory_misses: int  # first-ever use of an expert (any policy must fetch these)
    tokens: int
    expert_bytes: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else 0.0

    @property
    def misses_per_token(self) -> float:
        return self.misses / self.tokens if self.tokens else 0.0

    @property
    def bytes_per_token(self) -> float:
        return self.misses_per_token * self.expert_bytes

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(hit_rate=self.hit_rate, misses_per_token=self.misses_per_token, bytes_per_token=self.bytes_per_token)
        return d


def simulate_groups(groups: Sequence[Sequence[Hashable]], capacity: int, policy: str = "lru",
                    per_group: list | None = None) -> tuple[int, int, int]:
    """Serve request groups in order; returns (hits, misses, compulsory misses). ``per_group``, when a
    list, receives each group's miss count."""
    if policy not in POLICIES:
        raise ValueError(f"unknown cache policy {policy!r}; choose one of {POLICIES}")
    sizes = [len(set(g)) for g in groups]
    if capacity < max(sizes, default=0):
        raise ValueError(f"capacity {capacity} < experts needed by one token ({max(sizes)})")
    next_use: list[dict] = []
    if policy == "belady":
        upcoming: dict = {}
        nxt = [None] * len(groups)
        for i in range(len(groups) - 1, -1, -1):
            nxt[i] = {k: upcoming.get(k, float("inf")) for k in set(groups[i])}
            for k in set(groups[i]):
                upcoming[k] = i
        next_use = nxt
    cache: dict = {}  # key -> (last_use clock, uses, next use)
    seen: set = set()
    hits = misses = compulsory = clock = 0
    for i, g in enumerate(groups):
        need = list(dict.fromkeys(g))
        needset = set(need)
        m0 = misses
        for k in need:
            clock += 1  # recency is per access, in request order (a token's later experts are fresher)
            nu = next_use[i][k] if next_use else 0
            if k in cache:
                hits += 1
                cache[k] = (clock, cache[k][1] + 1, nu)
                continue
            misses += 1
            if k not in seen:
                compulsory += 1
                seen.add(k)
            if len(cache) >= capacity:
                cands = [c for c in cache if c not in needset]
                if policy == "lru":
                    victim = min(cands, key=lambda c: cache[c][0])
                elif policy == "lfu":
                    victim = min(cands, key=lambda c: (cache[c][1], cache[c][0]))
                else:
                    victim = max(cands, key=lambda c: (cache[c][2], -cache[c][0]))
                del cache[victim]
            cache[k] = (clock, 1, nu)
        if per_group is not None:
            per_group.append(misses - m0)
    return hits, misses, compulsory


def simulate_layer(ids: np.ndarray, capacity: int, policy: str = "lru", expert_bytes: int = 0) -> CacheStats:
    ids = np.asarray(ids)
    groups = [tuple(int(e) for e in row) for row in ids]
    h, m, c = simulate_groups(groups, capacity, policy)
    return CacheStats(policy, capacity, h + m, h, m, c, len(groups), expert_bytes)


def simulate_shared(ids: np.ndarray, capacity: int, policy: str = "lru", expert_bytes: int = 0) -> CacheStats:
    """ids [L, N, K]: one cache of ``capacity`` (layer, expert) slots for all layers."""
    ids = np.asarray(ids)
    L, N, _ = ids.shape
    groups = [tuple((l, int(e)) for e in ids[l, t]) for t in range(N) for l in range(L)]
    h, m, c = simulate_groups(groups, capacity, policy)
    return CacheStats(policy, capacity, h + m, h, m, c, N, expert_bytes)


def overlap_per_token(ids: np.ndarray, seq_starts: Sequence[int] | None = None) -> np.ndarray:
    """|E_t ∩ E_{t-1}| / K for t >= 1 of one layer's ids [N, K], skipping the first token of each sequence."""
    ids = np.asarray(ids)
    N, K = ids.shape
    if N < 2:
        return np.zeros(0)
    a, b = ids[1:, :, None], ids[:-1, None, :]
    inter = (a == b).any(-1).sum(-1) / K
    valid = np.ones(N - 1, dtype=bool)
    for s in (() if seq_starts is None else seq_starts):
        if 0 < s < N:
            valid[s - 1] = False
    return inter[valid]


def eor(ids: np.ndarray, seq_starts: Sequence[int] | None = None) -> float:
    """Expert Overlap Ratio of ids [L, N, K] (or [N, K]): mean over layers and t of |E_t ∩ E_{t-1}|/K."""
    ids = np.asarray(ids)
    if ids.ndim == 2:
        ids = ids[None]
    vals = [overlap_per_token(ids[l], seq_starts).mean() for l in range(ids.shape[0])]
    return float(np.mean(vals)) if vals else 0.0


@dataclass
class CacheReport:
    capacity: int
    top_k: int
    eor: float
    eor_per_layer: list[float]
    bound_misses_per_token: float  # sum over layers of K(1 - EOR_l) (Proposition 3.1, C = K)
    policies: dict[str, dict] = field(default_factory=dict)  # policy -> overall stats
    per_layer: dict[str, list[dict]] = field(default_factory=dict)
    shared: dict[str, dict] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def analyze(ids: np.ndarray, capacity: int | None = None, policies: Sequence[str] = POLICIES,
            expert_bytes: int = 0, seq_starts: Sequence[int] | None = None,
            shared_capacity: int | None = None) -> CacheReport:
    """Per-layer caches of ``capacity`` (default K) under each policy; totals summed over layers."""
    ids = np.asarray(ids)
    L, N, K = ids.shape
    C = capacity or K
    per_l_eor = [float(overlap_per_token(ids[l], seq_starts).mean()) if N > 1 else 0.0 for l in range(L)]
    rep = CacheReport(C, K, float(np.mean(per_l_eor)), per_l_eor, float(sum(K * (1 - e) for e in per_l_eor)))
    for pol in policies:
        stats = [simulate_layer(ids[l], C, pol, expert_bytes) for l in range(L)]
        tot = CacheStats(pol, C, sum(s.requests for s in stats), sum(s.hits for s in stats),
                         sum(s.misses for s in stats), sum(s.compulsory_misses for s in stats), N, expert_bytes)
        rep.policies[pol] = tot.to_dict()
        rep.per_layer[pol] = [s.to_dict() for s in stats]
        if shared_capacity:
            rep.shared[pol] = simulate_shared(ids, shared_capacity, pol, expert_bytes).to_dict()
    return rep


def plot_heatmap(before: np.ndarray, after: np.ndarray | None, num_experts: int, path: str, layer: int = 0,
                 max_tokens: int = 256, titles: tuple[str, str] = ("before", "after")) -> str:
    """Expert use over time (experts x tokens) of one layer, before vs after, saved as an image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    traces = [before] + ([after] if after is not None else [])
    fig, axes = plt.subplots(len(traces), 1, figsize=(10, 2.2 * len(traces) + 0.6), squeeze=False)
    for ax, tr, title in zip(axes[:, 0], traces, titles):
        ids = np.asarray(tr)[layer, :max_tokens]
        img = np.zeros((num_experts, ids.shape[0]))
        for t, row in enumerate(ids):
            img[row, t] = 1.0
        ax.imshow(img, aspect="auto", interpolation="nearest", cmap="Greys")
        ax.set_title(f"{title}: layer {layer}, EOR {eor(ids):.3f}")
        ax.set_ylabel("expert")
    axes[-1, 0].set_xlabel("token")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
