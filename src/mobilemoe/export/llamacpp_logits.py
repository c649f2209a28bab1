"""Logits from llama.cpp (llama-cpp-python's low-level API) for parity checks of exported GGUFs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mobilemoe.bench.llamacpp import LlamaCppModel, _lib
from mobilemoe.errors import MobileMoEError

GGML_TYPE_F32 = 0


class LlamaCppLogits(LlamaCppModel):
    """A llama.cpp model + context whose logits can be read. ``kv_f32`` keeps the KV cache in fp32
    and disables flash attention (llama.cpp's defaults round K/V and Q to f16)."""

    def __init__(self, path: str | os.PathLike, n_ctx: int = 256, threads: int = 2, kv_f32: bool = True,
                 n_batch: int = 512, seed: int = 0) -> None:
        L = self.L = _lib()
        self.model = L.llama_model_load_from_file(str(Path(path)).encode(), L.llama_model_default_params())
        if not self.model:
            raise MobileMoEError(f"{path}: llama.cpp could not load this GGUF")
        cparams = L.llama_context_default_params()
        cparams.n_ctx, cparams.n_batch, cparams.n_ubatch = n_ctx, n_batch, n_batch
        cparams.n_threads = cparams.n_threads_batch = threads
        if kv_f32:
            cparams.type_k = cparams.type_v = GGML_TYPE_F32
            if hasattr(cparams, "flash_attn_type"):
                cparams.flash_attn_type = 0  # disabled: the CPU flash-attention path rounds Q to f16
        self.ctx = L.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise MobileMoEError(f"{path}: llama.cpp could not create a context of {n_ctx} tokens")
        self.n_batch = n_batch
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.rng = np.random.default_rng(seed)

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
