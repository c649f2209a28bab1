"""mobilemoe._C.ExpertCache: the one expert cache of the offloading runtime and remoe.device.

Checked against a plain Python LRU on a synthetic store file (records of known bytes), so a wrong
slot, a wrong eviction order or a miscounted hit shows as different bytes or counters.
"""

from __future__ import annotations

import random
from collections import OrderedDict

import pytest
import torch

import mobilemoe.kernels as K

pytestmark = pytest.mark.skipif(not K.is_available(), reason="mobilemoe._C is not built")

E, PARTS = 12, (24, 40)  # experts per layer; bytes of the two record parts


def _store(tmp_path, layers: int = 2):
    """A store file whose record (layer, e) holds bytes derived from (layer, e, part)."""
    records, blob = {}, bytearray()
    for layer in range(layers):
        for e in range(E):
            records[layer, e] = len(blob)
            for p, n in enumerate(PARTS):
                blob += bytes((layer * 31 + e * 7 + p * 3 + i) % 251 for i in range(n))
            blob += bytes(-len(blob) % 64)  # padding between records, as the aligned real store
    path = tmp_path / "experts.bin"
    path.write_bytes(bytes(blob))
    return path, records


def _cache(path, records, capacity: int, layers: int = 2):
    c = K._lib().ExpertCache(str(path), False)
    for layer in range(layers):
        offs = torch.tensor([records[layer, e] for e in range(E)], dtype=torch.long)
        c.add_layer(layer, offs, [torch.zeros(capacity, n, dtype=torch.uint8) for n in PARTS])
    return c


def _expected(path, records, layer, e) -> list[bytes]:
    raw, off = path.read_bytes(), records[layer, e]
    return [raw[off:off + PARTS[0]], raw[off + PARTS[0]:off + sum(PARTS)]]


def test_lru_matches_a_python_lru_and_reads_the_right_bytes(tmp_path):
    path, records = _store(tmp_path)
    cache = _cache(path, records, capacity=4)
    model = {0: OrderedDict(), 1: OrderedDict()}
    hits = misses = 0
    rng = random.Random(0)
    for _ in range(300):
        layer = rng.randrange(2)
        need = rng.sample(range(E), 3)
        slots = cache.fetch(layer, need)
        for e, s in zip(need, slots):
            lru = model[layer]
            if e in lru:
                hits += 1
                lru.move_to_end(e)
            else:
                misses += 1
                if len(lru) >= 4:
                    victim = next(k for k in lru if k not in need)
                    del lru[victim]
                lru[e] = True
            got = [bytes(t[s].tolist()) for t in cache.slots(layer)]
            assert got == _expected(path, records, layer, e)
        assert all(e in model[layer] for e in need)
    st = cache.stats()
    assert (st["hits"], st["misses"]) == (hits, misses)
    assert st["bytes_read"] == misses * sum(PARTS)
    assert cache.resident_bytes() == sum(len(m) for m in model.values()) * sum(PARTS)


def test_needed_and_pinned_experts_are_never_evicted(tmp_path):
    path, records = _store(tmp_path)
    cache = _cache(path, records, capacity=3)
    first = cache.fetch(0, [0, 1, 2])
    # 3 is a miss in a full layer; 1 and 2 are pinned, so only 0 may go
    slot = cache.fetch(0, [3], [1, 2])[0]
    assert slot == first[0]
    assert cache.fetch(0, [1, 2]) == first[1:]
    assert cache.stats()["misses"] == 4
    with pytest.raises(RuntimeError, match="no slot to evict"):
        cache.fetch(0, [4, 5, 6, 7])  # more experts than slots in one call


def test_max_resident_caps_all_layers_and_evicts_the_fullest(tmp_path):
    path, records = _store(tmp_path)
    cache = _cache(path, records, capacity=6)
    cache.set_max_resident(4)
    cache.fetch(0, [0, 1, 2])
    cache.fetch(1, [0])
    assert cache.resident_bytes() == 4 * sum(PARTS)
    cache.fetch(1, [1])  # over the cap: layer 0 (fullest) gives up its least recently used, expert 0
    assert cache.resident_bytes() == 4 * sum(PARTS)
    misses = cache.stats()["misses"]
    cache.fetch(0, [1, 2])
    assert cache.stats()["misses"] == misses  # still resident
    cache.fetch(0, [0])
    assert cache.stats()["misses"] == misses + 1  # was evicted


def test_bad_calls_are_clear_errors(tmp_path):
    path, records = _store(tmp_path)
    cache = _cache(path, records, capacity=2, layers=1)
    with pytest.raises(RuntimeError, match="layer 5 was not added"):
        cache.fetch(5, [0])
    with pytest.raises(RuntimeError, match="expert 12 out of range"):
        cache.fetch(0, [12])
    with pytest.raises(RuntimeError, match="cannot open the expert store"):
        K._lib().ExpertCache(str(tmp_path / "missing.bin"), False)
    short = tmp_path / "short.bin"
    short.write_bytes(path.read_bytes()[:records[0, 3] + 5])
    cut = _cache(short, records, capacity=2, layers=1)
    with pytest.raises(RuntimeError, match="unexpected end of file"):
        cut.fetch(0, [3])
