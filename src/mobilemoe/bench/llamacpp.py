"""Time llama.cpp (through llama-cpp-python's low-level API) on a GGUF: prefill and decode.

Mirrors llama-bench: batch 2048 / micro-batch 512, the same thread count for prompt and generation,
random token ids, KV cache cleared between measurements.

llama.cpp is native code that can die by a signal (its AMX matmul SIGILLs on some Xeons), which
would take the whole Python process with it. So the project runs it only in a child process:
:func:`run_in_child` runs a picklable function in a fresh interpreter and turns a crash into one
:class:`LlamaCppCrash` line such as ``llama.cpp crashed (SIGILL, Illegal instruction) while ...``.
"""

from __future__ import annotations

import os
import pickle
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mobilemoe.errors import MobileMoEError


_QUIET_LOG = None  # the ctypes callback must outlive every llama.cpp call, so it lives here
# Test hook: a signal name (e.g. SIGILL); a process that loads llama.cpp kills itself with it
# instead, so the tests can prove a crash is reported without a CPU that really crashes.
CRASH_HOOK_ENV = "MOBILEMOE_TEST_LLAMA_CPP_CRASH"


class LlamaCppCrash(MobileMoEError):
    """llama.cpp's process died (by a signal or a non-zero exit) or timed out."""


def exit_description(code: int) -> str:
    """'SIGILL, Illegal instruction' for a death by signal (a negative returncode), else 'exit code N'."""
    if code < 0:
        try:
            sig = signal.Signals(-code)
            return f"{sig.name}, {signal.strsignal(sig)}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def _child_main() -> None:
    """Entry point of the child: read (fn, args, kwargs) pickled on stdin, write ("ok", result) or
    ("error", message) pickled on the original stdout."""
    import resource

    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # whatever native code prints goes to stderr, never into the result stream
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crash leaves no core file behind
    fn, args, kwargs = pickle.load(sys.stdin.buffer)
    try:
        reply = ("ok", fn(*args, **kwargs))
    except MobileMoEError as exc:
        reply = ("error", str(exc))
    except Exception as exc:  # the parent re-raises it as one line
        reply = ("error", f"{type(exc).__name__}: {exc}")
    pickle.dump(reply, out)
    out.flush()


def run_in_child(fn: Callable[..., Any], *args: Any, what: str, timeout: float = 3600, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` in a fresh Python process (fn and its arguments must pickle).

    An error raised there comes back as a MobileMoEError with its message; a child killed by a
    signal, exiting non-zero or running past ``timeout`` seconds raises :class:`LlamaCppCrash`:
    ``llama.cpp crashed (SIGILL, Illegal instruction) while {what}: <last stderr line>``.
    """
    import mobilemoe

    env = dict(os.environ)
    src = str(Path(mobilemoe.__file__).resolve().parents[1])  # the same mobilemoe, even uninstalled
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-c", "from mobilemoe.bench.llamacpp import _child_main; _child_main()"]
    try:
        proc = subprocess.run(cmd, input=pickle.dumps((fn, args, kwargs)), capture_output=True, env=env,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        raise LlamaCppCrash(f"llama.cpp timed out after {timeout:g} s while {what}") from None
    if proc.returncode != 0 or not proc.stdout:
        lines = [ln for ln in proc.stderr.decode(errors="replace").splitlines() if ln.strip()]
        tail = f": {lines[-1].strip()}" if lines else ""
        raise LlamaCppCrash(f"llama.cpp crashed ({exit_description(proc.returncode)}) while {what}{tail}")
    tag, payload = pickle.loads(proc.stdout)
    if tag == "error":
        raise MobileMoEError(f"llama.cpp failed while {what}: {payload}")
    return payload


def _maybe_test_crash() -> None:
    name = os.environ.get(CRASH_HOOK_ENV)
    if name:
        signal.raise_signal(signal.Signals[name])


def _lib():
    global _QUIET_LOG
    _maybe_test_crash()
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


def system_info() -> str:
    """llama.cpp's ``llama_print_system_info()`` (the CPU features its build uses). Call it in a child."""
    return _lib().llama_print_system_info().decode()


def time_prefill_decode(path: str, prompt: int, gen: int, reps: int, threads: int) -> dict[str, float]:
    """Median prefill and decode tok/s of ``reps`` runs (prompt random tokens, then gen decode steps).
    Loads llama.cpp: run it through :func:`run_in_child`."""
    ll = LlamaCppModel(path, n_ctx=prompt + gen + 8, threads=threads)
    try:
        pre, dec = [], []
        for _ in range(reps):
            ll.clear()
            pre.append(ll.prefill(ll.random_ids(prompt)))
            dec.append(ll.decode(gen))
    finally:
        ll.close()
    return {"prefill_tok_s": prompt / statistics.median(pre), "decode_tok_s": gen / statistics.median(dec)}
