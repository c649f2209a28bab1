"""Logits from llama.cpp (llama-cpp-python's low-level API) for parity checks of exported GGUFs."""

from __future__ import annotations

import os

import numpy as np

from mobilemoe.bench.llamacpp import LlamaCppModel

GGML_TYPE_F32 = 0


class LlamaCppLogits(LlamaCppModel):
    """A llama.cpp model + context whose logits can be read. ``kv_f32`` keeps the KV cache in fp32
    and disables flash attention (llama.cpp's defaults round K/V and Q to f16)."""

    def __init__(self, path: str | os.PathLike, n_ctx: int = 256, threads: int = 2, kv_f32: bool = True,
                 n_batch: int = 512, seed: int = 0) -> None:
        self.kv_f32 = kv_f32
        super().__init__(path, n_ctx=n_ctx, threads=threads, n_batch=n_batch, n_ubatch=n_batch, seed=seed)

    def configure_context(self, cparams) -> None:
        if self.kv_f32:
            cparams.type_k = cparams.type_v = GGML_TYPE_F32
            if hasattr(cparams, "flash_attn_type"):
                cparams.flash_attn_type = 0  # disabled: the CPU flash-attention path rounds Q to f16

    def last_logits(self) -> np.ndarray:
        ptr = self.L.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def logits(self, ids: list[int]) -> np.ndarray:
        """Feed ``ids`` (appended to the cache) in one batch; the logits [V] after the last one."""
        self._decode(list(ids))
        return self.last_logits()

    def stepwise_logits(self, ids: list[int]) -> np.ndarray:
        """Clear the cache, feed ``ids`` one token at a time; logits [T, V] at every position."""
        self.clear()
        rows = []
        for tok in ids:
            self._decode([tok])
            rows.append(self.last_logits())
        return np.stack(rows)
