"""PretrainLoader: shapes, seeding, exact resume from a saved state, disjoint data-parallel ranks."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from mobilemoe.data import DataError, PretrainLoader, shard_documents

B, T = 4, 16


@pytest.fixture(scope="module")
def shards(tokenizer, tmp_path_factory, make_docs):
    out = tmp_path_factory.mktemp("shards")
    docs = make_docs(80, seed=7)
    return shard_documents(docs, tokenizer, out, source="t", shard_chars=4000, workers=1, progress=False)


def take(loader, n):
    return list(itertools.islice(loader, n))


def rows_of(batches) -> list[bytes]:
    return [row.numpy().tobytes() for x, _ in batches for row in x]


def test_batch_shapes_and_shift(shards):
    loader = PretrainLoader(shards, B, T, seed=0)
    x, y = next(loader)
    assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_same_seed_same_batches_other_seed_differs(shards):
    a = take(PretrainLoader(shards.directory, B, T, seed=3), 5)
    b = take(PretrainLoader(shards.directory, B, T, seed=3), 5)
    c = take(PretrainLoader(shards.directory, B, T, seed=4), 5)
    assert all(torch.equal(p, q) for (xa, ya), (xb, yb) in zip(a, b) for p, q in ((xa, xb), (ya, yb)))
    assert rows_of(a) != rows_of(c)


def test_state_restore_gives_exact_following_batches(shards):
    loader = PretrainLoader(shards, B, T, seed=1)
    per_epoch = loader.batches_per_epoch()
    take(loader, per_epoch - 2)  # stop near the end of the epoch, so the continuation crosses into epoch 1
    state = loader.state_dict()
    expected = take(loader, 5)
    assert loader.epoch == 1

    resumed = PretrainLoader(shards, B, T, seed=1)
    resumed.load_state_dict(dict(state))
    got = take(resumed, 5)
    assert all(torch.equal(e[0], g[0]) and torch.equal(e[1], g[1]) for e, g in zip(expected, got))


def test_epoch_covers_every_window_once(shards):
    loader = PretrainLoader(shards, 1, T, seed=0)
    rows = rows_of(take(loader, loader.num_windows))
    assert len(set(rows)) == loader.num_windows
    unshuffled = rows_of(take(PretrainLoader(shards, 1, T, shuffle=False), loader.num_windows))
    assert sorted(rows) == sorted(unshuffled) and rows != unshuffled


def test_ranks_see_disjoint_data(shards):
    world = 3
    loaders = [PretrainLoader(shards, B, T, seed=5, rank=r, world_size=world) for r in range(world)]
    n = loaders[0].batches_per_epoch()
    assert all(ld.batches_per_epoch() == n for ld in loaders)  # same step count on every rank
    seen = [set(rows_of(take(ld, n))) for ld in loaders]
    assert all(len(s) == n * B for s in seen)
    assert all(not seen[i] & seen[j] for i in range(world) for j in range(i + 1, world))
    assert sum(map(len, seen)) > 0.9 * loaders[0].num_windows


def test_state_mismatch_and_bad_settings(shards):
    state = PretrainLoader(shards, B, T, seed=1).state_dict()
    with pytest.raises(DataError, match="seed"):
        PretrainLoader(shards, B, T, seed=2).load_state_dict(state)
    with pytest.raises(DataError, match="rank"):
        PretrainLoader(shards, B, T, rank=2, world_size=2)
    with pytest.raises(DataError, match="not enough data"):
        next(PretrainLoader(shards, 10_000, T))
    with pytest.raises(DataError, match="smaller seq_len"):
        PretrainLoader(shards, B, 10**7)


def test_windows_are_the_shard_tokens(shards):
    x, y = next(PretrainLoader(shards, 2, T, shuffle=False))
    first = np.asarray(shards.arrays()[0][: 2 * T + 1], dtype=np.int64)
    assert x[0].tolist() == first[:T].tolist() and y[1].tolist() == first[T + 1 : 2 * T + 1].tolist()
