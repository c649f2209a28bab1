"""Device model (storage bandwidth + latency -> projected TPOT) and a real on-disk expert store.

Projected time per output token with experts offloaded to storage::

    TPOT = compute_ms + sum over MoE layers of [ latency (if the layer misses at all) + misses_l * expert_bytes / bandwidth ]

i.e. each layer issues its misses together (one latency, then the bytes stream), layers in sequence.
The storage profiles are nominal datasheet-class figures (random-read latency, sustained read
bandwidth); ``measure_local_disk`` measures this machine with ``os.pread`` after dropping the file
from the page cache (``posix_fadvise DONTNEED``, best effort).

:class:`ExpertStore` replays a routing trace against the expert store of
:mod:`mobilemoe.runtime.offload` (one file, each expert's packed INT4 bytes contiguous) through the
native runtime's expert cache (at most C experts per layer and a byte budget), counting real read
time and bytes. It measures storage alone; the native offloading runtime
(``Engine.load(..., offload=ExpertOffload(...))``) measures real decode with the same file and cache.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from mobilemoe.errors import MobileMoEError


@dataclass(frozen=True)
class StorageProfile:
    name: str
    bandwidth_gbps: float  # sustained read, GB/s (1e9 bytes)
    latency_us: float  # per batched random read
    note: str = ""


PROFILES: dict[str, StorageProfile] = {
    "phone-ufs4": StorageProfile("phone-ufs4", 3.5, 120.0, "UFS 4.0 phone flash (nominal)"),
    "phone-ufs3": StorageProfile("phone-ufs3", 1.8, 180.0, "UFS 3.1 phone flash (nominal)"),
    "jetson-nvme": StorageProfile("jetson-nvme", 2.5, 90.0, "Jetson Orin + PCIe Gen4 NVMe (nominal)"),
}


def projected_tpot_ms(misses_per_layer_token: np.ndarray | list[float], expert_bytes: int,
                      profile: StorageProfile, compute_ms: float = 0.0,
                      miss_prob_per_layer: list[float] | None = None) -> float:
    """TPOT from mean misses per token of each layer. ``miss_prob_per_layer``: fraction of tokens at
    which that layer misses at all (pays the latency); defaults to min(1, mean misses)."""
    m = np.asarray(misses_per_layer_token, dtype=float)
    p = np.minimum(1.0, m) if miss_prob_per_layer is None else np.asarray(miss_prob_per_layer, dtype=float)
    io_s = (p * profile.latency_us * 1e-6).sum() + m.sum() * expert_bytes / (profile.bandwidth_gbps * 1e9)
    return float(compute_ms + io_s * 1e3)


def miss_profile(ids: np.ndarray, capacity: int, policy: str = "lru",
                 mask: np.ndarray | None = None) -> tuple[list[float], list[float]]:
    """Per layer: mean misses per token and the fraction of tokens with any miss. ``mask`` [N] picks
    the tokens counted (e.g. the generated ones); the others only warm the cache."""
    from mobilemoe.remoe.cache_sim import simulate_groups

    ids = np.asarray(ids)
    means, probs = [], []
    for l in range(ids.shape[0]):
        per: list[int] = []
        simulate_groups([tuple(int(e) for e in row) for row in ids[l]], capacity, policy, per_group=per)
        arr = np.asarray(per, dtype=float)
        if mask is not None:
            arr = arr[np.asarray(mask, bool)]
        means.append(float(arr.mean()) if arr.size else 0.0)
        probs.append(float((arr > 0).mean()) if arr.size else 0.0)
    return means, probs


def measure_local_disk(path: str | Path | None = None, size_mb: int = 64, block_kb: int = 256,
                       reads: int = 64) -> StorageProfile:
    """Measure random ``os.pread`` latency (4 KiB) and bandwidth (``block_kb`` blocks) of this machine's disk."""
    import tempfile

    d = Path(path) if path else Path(tempfile.mkdtemp(prefix="mobilemoe-disk-"))
    f = d / "probe.bin"
    data = os.urandom(1 << 20)
    with open(f, "wb") as fh:
        for _ in range(size_mb):
            fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    fd = os.open(f, os.O_RDONLY)
    try:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        rng = np.random.default_rng(0)
        size = size_mb << 20
        t0 = time.perf_counter()
        for off in rng.integers(0, size - 4096, reads):
            os.pread(fd, 4096, int(off) // 4096 * 4096)
        lat = (time.perf_counter() - t0) / reads
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        blk = block_kb << 10
        t0 = time.perf_counter()
        total = 0
        for off in rng.integers(0, size - blk, reads):
            total += len(os.pread(fd, blk, int(off) // 4096 * 4096))
        bw = total / max(time.perf_counter() - t0, 1e-9) / 1e9
    finally:
        os.close(fd)
        f.unlink(missing_ok=True)
        if path is None:
            d.rmdir()
    return StorageProfile("this-machine", round(bw, 3), round(lat * 1e6, 1), "measured with os.pread")


# ---------------------------------------------------------------------- the expert store
# The store format (one page-aligned packed record per expert) belongs to the runtime; the native
# offloading runtime reads the same file (mobilemoe.runtime.offload).
from mobilemoe.runtime.offload import (STORE_FILE, read_store_index, record_offsets, slot_tensors,  # noqa: E402
                                       write_expert_store)


class ExpertStore:
    """RAM cache (LRU) of at most ``capacity`` experts per layer and ``byte_budget`` bytes in total,
    backed by the store file: the native runtime's own expert cache (``mobilemoe._C.ExpertCache``,
    one ``preadv`` per miss), so a replay here measures exactly the reads offloaded decode does.
    ``get`` returns the expert's tensors by part name: views into its cache slot, valid until that
    expert is evicted (clone to keep them)."""

    def __init__(self, store_dir: str | Path, capacity: int, byte_budget: int | None = None,
                 drop_page_cache: bool = False) -> None:
        from mobilemoe.kernels import _lib

        d = Path(store_dir)
        self.index = read_store_index(d)
        self.capacity, self.byte_budget = capacity, byte_budget
        self._cache = _lib().ExpertCache(str(d / STORE_FILE), drop_page_cache)
        self._parts: dict[int, list[str]] = {}
        record_bytes = 0
        for layer, records in self.index["layers"].items():
            parts = records[0]["parts"]
            if [p["offset"] for p in parts] != [sum(q["nbytes"] for q in parts[:i]) for i in range(len(parts))]:
                raise MobileMoEError(f"{d}: layer {layer}: record parts are not back to back")
            n = min(capacity, len(records))
            self._cache.add_layer(int(layer), record_offsets(self.index, int(layer)),
                                  slot_tensors(self.index, int(layer), n))
            self._parts[int(layer)] = [p["name"] for p in parts]
            record_bytes = max(record_bytes, records[0]["nbytes"])
        if byte_budget is not None:
            self._cache.set_max_resident(int(byte_budget // record_bytes) if record_bytes else 0)

    def close(self) -> None:
        self._cache = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def get(self, layer: int, expert: int, pinned: tuple[int, ...] = ()) -> dict[str, torch.Tensor]:
        """Expert ``expert`` of ``layer`` (read on a miss), never evicting one of ``pinned``."""
        slot = self._cache.fetch(layer, [expert], list(pinned))[0]
        return {name: t[slot] for name, t in zip(self._parts[layer], self._cache.slots(layer))}

    def replay(self, ids: np.ndarray, moe_layers: list[int]) -> dict:
        """Fetch every (token, layer) expert set of a trace [L, N, K]; returns counters."""
        ids = np.asarray(ids)
        t0 = time.perf_counter()
        for t in range(ids.shape[1]):
            for li, layer in enumerate(moe_layers):
                self._cache.fetch(layer, [int(e) for e in ids[li, t]])
        wall = time.perf_counter() - t0
        n = ids.shape[1]
        st = self.stats()
        return {"tokens": n, "hits": st["hits"], "misses": st["misses"], "bytes_read": st["bytes_read"],
                "read_seconds": st["read_seconds"], "wall_seconds": wall,
                "read_ms_per_token": 1e3 * st["read_seconds"] / max(n, 1),
                "bytes_per_token": st["bytes_read"] / max(n, 1)}

    @property
    def bytes_cached(self) -> int:
        return int(self._cache.resident_bytes())

    def stats(self) -> dict:
        st = self._cache.stats()
        return {"hits": int(st["hits"]), "misses": int(st["misses"]), "bytes_read": int(st["bytes_read"]),
                "read_seconds": st["read_seconds"], "bytes_cached": self.bytes_cached}


def profile_dict(p: StorageProfile) -> dict:
    return asdict(p)
