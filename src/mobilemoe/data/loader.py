"""Seeded, resumable, rank-aware batch loaders over token shards.

:class:`PretrainLoader` serves **shuffled contiguous chunks**: each shard is cut into
non-overlapping windows of ``seq_len + 1`` tokens at stride ``seq_len`` (so the target of a window's
last position is the first token of the next window); windows never straddle two shards, which drops
fewer than ``seq_len`` tokens per shard. Each epoch visits every window once, in an order that is a
permutation seeded by ``(seed, epoch)``. Documents are packed back to back (separated by EOS), as in
the shards; the model sees across document boundaries, which is the usual packed-pretraining trade.

Data-parallel split: the epoch order is the same on every rank; rank ``r`` of ``world_size`` takes
``order[r::world_size]``, truncated so every rank has the same number of batches (no DDP hangs).
Ranks therefore see disjoint windows.

Resume-exact: the position is just ``(epoch, step)``; :meth:`EpochBatcher.state_dict` saves it and
:meth:`EpochBatcher.load_state_dict` restores it, after which the loader yields exactly the batches an
uninterrupted run would have (the order is recomputed from the seed, not stored). Orders come from
NumPy's PCG64 ``Generator``, so they are reproducible for a given NumPy version.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from mobilemoe.data.readers import DataError
from mobilemoe.data.shards import ShardIndex, load_index


class EpochBatcher:
    """Base class: seeded epochs of items, split across ranks, cut into batches, with a saveable position.

    Subclasses define the global item order of an epoch (:meth:`_epoch_order`, identical on every
    rank), how items become a batch (:meth:`_make_batch`) and which settings a saved state must match
    (:meth:`_settings`). Iterating never ends; a trainer stops after its own step budget.
    """

    def __init__(self, batch_size: int, seed: int, rank: int, world_size: int) -> None:
        if batch_size <= 0:
            raise DataError(f"batch_size must be positive, got {batch_size}")
        if seed < 0:
            raise DataError(f"seed must be >= 0, got {seed}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise DataError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.epoch = 0  # current epoch
        self.step = 0  # index of the next batch within the epoch
        self._cached: tuple[int, np.ndarray] | None = None  # (epoch, this rank's items)

    # --- subclass hooks -------------------------------------------------------------------
    def _epoch_order(self, epoch: int) -> np.ndarray:
        raise NotImplementedError

    def _make_batch(self, items: np.ndarray) -> Any:
        raise NotImplementedError

    def _settings(self) -> dict[str, Any]:
        return {}

    # --- iteration --------------------------------------------------------------------------
    def _rank_items(self) -> np.ndarray:
        """This rank's items for ``self.epoch`` (cached: computing an order costs O(items))."""
        if self._cached is None or self._cached[0] != self.epoch:
            order = self._epoch_order(self.epoch)
            per_rank = len(order) // self.world_size
            if per_rank < self.batch_size:
                raise DataError(
                    f"not enough data for one batch: {len(order)} sequences for world_size={self.world_size} "
                    f"x batch_size={self.batch_size}; use more data or smaller batches"
                )
            self._cached = (self.epoch, order[self.rank :: self.world_size][:per_rank])
        return self._cached[1]

    def batches_per_epoch(self) -> int:
        """Number of batches this rank gets in the current epoch."""
        return len(self._rank_items()) // self.batch_size

    def __iter__(self) -> "EpochBatcher":
        return self

    def __next__(self) -> Any:
        if self.step >= self.batches_per_epoch():
            self.epoch, self.step = self.epoch + 1, 0
        b = self.batch_size
        items = self._rank_items()[self.step * b : (self.step + 1) * b]
        self.step += 1
        return self._make_batch(items)

    # --- resume -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The position (next batch) plus the settings it is valid for; plain ints/strs (JSON-safe)."""
        return {
            "epoch": self.epoch,
            "step": self.step,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            **self._settings(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position; a :class:`DataError` if the loader settings differ."""
        mine = self.state_dict()
        diff = {k: (state.get(k), v) for k, v in mine.items() if k not in ("epoch", "step") and state.get(k) != v}
        if diff:
            raise DataError(f"loader state does not match this loader (saved, current): {diff}")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])


def shift_targets(rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``[B, T+1]`` token rows into int64 inputs ``x = rows[:, :-1]`` and targets ``y = rows[:, 1:]``."""
    t = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64))
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()


class PretrainLoader(EpochBatcher):
    """Yields ``(x, y)`` int64 tensors of shape ``[batch_size, seq_len]`` from a shard directory.

    ``shuffle=False`` serves windows in shard order (use it for validation: every call from a fresh
    loader returns the same batches).
    """

    def __init__(
        self,
        shards: ShardIndex | str | os.PathLike,
        batch_size: int,
        seq_len: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ) -> None:
        super().__init__(batch_size, seed, rank, world_size)
        if seq_len <= 0:
            raise DataError(f"seq_len must be positive, got {seq_len}")
        index = shards if isinstance(shards, ShardIndex) else load_index(shards)
        self.seq_len, self.shuffle = seq_len, shuffle
        self._arrays = index.arrays()
        counts = [max(len(a) - 1, 0) // seq_len for a in self._arrays]
        self._first_window = np.cumsum([0] + counts)  # window id where each shard starts
        self.num_windows = int(self._first_window[-1])
        if self.num_windows == 0:
            raise DataError(f"{index.directory}: no shard has {seq_len + 1} tokens; use a smaller seq_len")

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_windows)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)

    def _make_batch(self, items: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.seq_len
        rows = np.empty((len(items), T + 1), dtype=np.int64)
        shard_of = np.searchsorted(self._first_window, items, side="right") - 1
        for r, (window, s) in enumerate(zip(items, shard_of)):
            start = int(window - self._first_window[s]) * T
            rows[r] = self._arrays[s][start : start + T + 1]
        return shift_targets(rows)

    def _settings(self) -> dict[str, Any]:
        return {"seq_len": self.seq_len, "num_windows": self.num_windows, "shuffle": self.shuffle}
