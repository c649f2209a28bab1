"""Time llama.cpp (through llama-cpp-python's low-level API) on a GGUF: prefill and decode.

Mirrors llama-bench: batch 2048 / micro-batch 512, the same thread count for prompt and generation,
random token ids, KV cache cleared between measurements.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from mobilemoe.errors import MobileMoEError


_QUIET_LOG = None  # the ctypes callback must outlive every llama.cpp call, so it lives here


def _lib():
    global _QUIET_LOG
    try:
        import llama_cpp
    except ImportError:
        raise MobileMoEError("llama-cpp-python is not installed: pip install llama-cpp-python==0.3.36 (make setup does) "
                             "(builds llama.cpp from source, ~5 min on 2 cores)") from None
    if _QUIET_LOG is None:
        _QUIET_LOG = llama_cpp.llama_log_callback(lambda level, text, data: None)
        llama_cpp.llama_log_set(_QUIET_LOG, None)
        llama_cpp.llama_backend_init()
    return llama_cpp


class LlamaCppModel:
    """One loaded GGUF with one context; ``prefill`` and ``decode`` return seconds."""

    def __init__(self, path: str | os.PathLike, n_ctx: int, threads: int, n_batch: int = 2048,
                 n_ubatch: int = 512, seed: int = 0) -> None:
        L = self.L = _lib()
        mparams = L.llama_model_default_params()
        self.model = L.llama_model_load_from_file(str(Path(path)).encode(), mparams)
        if not self.model:
            raise MobileMoEError(f"{path}: llama.cpp could not load this GGUF")
        cparams = L.llama_context_default_params()
        cparams.n_ctx, cparams.n_batch, cparams.n_ubatch = n_ctx, n_batch, n_ubatch
        cparams.n_threads = cparams.n_threads_batch = threads
        self.configure_context(cparams)
        self.ctx = L.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise MobileMoEError(f"{path}: llama.cpp could not create a context of {n_ctx} tokens")
        self.n_batch = n_batch
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.rng = np.random.default_rng(seed)

    def configure_context(self, cparams) -> None:
        """Hook for subclasses to adjust llama.cpp context parameters before the context is made."""

    def _decode(self, ids: list[int]) -> None:
        arr = (self.L.llama_token * len(ids))(*ids)
        rc = self.L.llama_decode(self.ctx, self.L.llama_batch_get_one(arr, len(ids)))
        if rc != 0:
            raise MobileMoEError(f"llama_decode failed with code {rc}")

    def clear(self) -> None:
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)

    def random_ids(self, n: int) -> list[int]:
        return self.rng.integers(0, self.n_vocab, n).tolist()

    def prefill(self, ids: list[int]) -> float:
        """Seconds to process ``ids`` after what the cache holds (chunks of n_batch, like llama-bench)."""
        t0 = time.perf_counter()
        for start in range(0, len(ids), self.n_batch):
            self._decode(ids[start:start + self.n_batch])
        self.L.llama_synchronize(self.ctx)
        return time.perf_counter() - t0

    def decode(self, n_tokens: int) -> float:
        """Seconds to generate ``n_tokens`` one at a time after what the cache holds."""
        ids = self.random_ids(n_tokens)
        t0 = time.perf_counter()
        for tok in ids:
            self._decode([tok])
        self.L.llama_synchronize(self.ctx)
        return time.perf_counter() - t0

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self.L.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            self.L.llama_model_free(self.model)
            self.model = None
