"""What the trainer needs from data: a :class:`BatchSource`, plus small built-in sources.

The trainer only ever calls ``next_batch()`` and ``state_dict()``/``load_state_dict()``, so any
loader with that shape plugs in (the ``mobilemoe.data`` loader is adapted in
:mod:`mobilemoe.train.recipe`). Targets use ``-100`` for positions without loss (SFT prompts).

:class:`TokenWindowSource` is the built-in source: random windows of ``seq_len + 1`` tokens from
one token array, counter-based (batch ``n`` depends only on ``(seed, n)``), so its state is one
integer and resuming is exact. Under data parallelism every rank draws the same global batch of
``batch_size * world_size`` windows and keeps its own slice, so a 2-rank run sees exactly the
batches a 1-rank run with twice the batch size sees.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from mobilemoe.errors import MobileMoEError

IGNORE_INDEX = -100


@runtime_checkable
class BatchSource(Protocol):
    """An endless, resumable source of ``(input_ids [B, T], targets [B, T])`` int64 batches."""

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class TokenWindowSource:
    """Random ``seq_len``-token windows from a 1-D token array (optionally with a loss mask).

    ``loss_mask[i]`` (same length as ``tokens``) says whether token ``i`` is a *target* that counts
    in the loss; masked targets become ``-100``.
    """

    def __init__(self, tokens: np.ndarray | torch.Tensor, seq_len: int, batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, loss_mask: np.ndarray | torch.Tensor | None = None) -> None:
        self.tokens = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
        if self.tokens.ndim != 1:
            raise MobileMoEError(f"token array must be 1-D, got shape {tuple(self.tokens.shape)}")
        if len(self.tokens) < seq_len + 2:
            raise MobileMoEError(f"not enough tokens ({len(self.tokens)}) for seq_len {seq_len}: "
                                 f"need at least {seq_len + 2}; use more data or a shorter seq_len")
        self.mask = None if loss_mask is None else torch.as_tensor(np.asarray(loss_mask), dtype=torch.bool)
        if self.mask is not None and self.mask.shape != self.tokens.shape:
            raise MobileMoEError("loss_mask must have the same length as tokens")
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.batches = 0  # batches handed out so far: the whole state

    def batch_at(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch number ``n`` (pure function of seed and n)."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + n)
        high = len(self.tokens) - self.seq_len - 1
        starts = torch.randint(0, high + 1, (self.batch_size * self.world_size,), generator=gen)
        starts = starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        idx = starts[:, None] + torch.arange(self.seq_len + 1)[None, :]
        window = self.tokens[idx]
        x, y = window[:, :-1].clone(), window[:, 1:].clone()
        if self.mask is not None:
            y[~self.mask[idx[:, 1:]]] = IGNORE_INDEX
        return x, y

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.batch_at(self.batches)
        self.batches += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "token_window", "batches": self.batches, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise MobileMoEError(f"data state was saved with seed {state.get('seed')}, this run uses {self.seed}")
        self.batches = int(state["batches"])


class ByteTokenizer:
    """Fallback tokenizer: UTF-8 bytes are ids 0-255, EOS is 256 (vocab 257)."""

    eos_id = 256
    bos_id = 256
    vocab_size = 257
    name = "byte"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def pack_documents(docs, tokenizer, max_tokens: int | None = None) -> np.ndarray:
    """Concatenate ``encode(doc) + [eos]`` for each document into one int64 array."""
    out: list[int] = []
    for doc in docs:
        out.extend(tokenizer.encode(doc))
        out.append(tokenizer.eos_id)
        if max_tokens is not None and len(out) >= max_tokens:
            out = out[:max_tokens]
            break
    return np.asarray(out, dtype=np.int64)
