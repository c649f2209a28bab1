"""Logits from llama.cpp (llama-cpp-python's low-level API) for parity checks of exported GGUFs.

:func:`llama_logits` and :func:`llama_tokenize` run llama.cpp in a child process
(:func:`mobilemoe.bench.llamacpp.run_in_child`), so a llama.cpp crash is a one-line
:class:`~mobilemoe.bench.llamacpp.LlamaCppCrash`, not a dead interpreter.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mobilemoe.bench.llamacpp import LlamaCppModel, run_in_child

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


def _logits_job(path: str, ids: list[int], n_ctx: int) -> tuple[np.ndarray, np.ndarray]:
    ll = LlamaCppLogits(path, n_ctx=n_ctx)
    try:
        step = ll.stepwise_logits(ids)  # one token per call: exercises the KV cache
        ll.clear()
        return step, ll.logits(ids)  # the whole prompt in one batch
    finally:
        ll.close()


def llama_logits(path: str | os.PathLike, ids: list[int], n_ctx: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """llama.cpp's logits on ``ids`` (fp32 KV cache), in a child process: (stepwise [T, V], batched [V])."""
    return run_in_child(_logits_job, str(path), [int(i) for i in ids], n_ctx,
                        what=f"decoding {Path(path).name}")


def _tokenize_job(path: str, text: str) -> list[int]:
    ll = LlamaCppLogits(path, n_ctx=64)
    try:
        L = ll.L
        vocab = L.llama_model_get_vocab(ll.model)
        raw = text.encode()
        cap = len(raw) + 8
        buf = (L.llama_token * cap)()
        n = L.llama_tokenize(vocab, raw, len(raw), buf, cap, False, False)
        return list(buf[:n])
    finally:
        ll.close()


def llama_tokenize(path: str | os.PathLike, text: str) -> list[int]:
    """llama.cpp's tokenization of ``text`` (no BOS, no special tokens), in a child process."""
    return run_in_child(_tokenize_job, str(path), text, what=f"tokenizing with {Path(path).name}")
