"""Engine backends over exported artifacts: an ExecuTorch ``.pte`` and a llama.cpp ``.gguf``.

Both answer the engine's :class:`~mobilemoe.runtime.engine.Backend` protocol (``reset()``,
``forward(ids, start_pos) -> last-position logits [V]``, ``max_seq_len``), so ``generate`` runs the
same sampling, stop ids and ``--json`` record on a checkpoint, a ``.pte`` or a ``.gguf``.

* :class:`PteBackend` runs the ``.pte`` in-process with ExecuTorch's runtime
  (:class:`~mobilemoe.export.executorch.PteRunner`); its context is the static KV cache the program
  was exported with, read from the program itself.
* :class:`LlamaCppBackend` runs llama.cpp in a persistent child process (spawned, talking over a
  pipe) that keeps the model and its KV cache between requests: llama.cpp can die by a signal, which
  must be one :class:`~mobilemoe.bench.llamacpp.LlamaCppCrash` line, never a dead parent.

Artifacts carry no ``config.json``; :class:`ArtifactConfig` holds the few fields the engine reads.
"""

from __future__ import annotations

import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from mobilemoe.errors import MobileMoEError

ARTIFACT_SUFFIXES = {".pte": "pte", ".gguf": "gguf"}


def artifact_kind(path: str | os.PathLike) -> str:
    """"pte" or "gguf" by the file suffix, else "checkpoint" (a directory)."""
    return ARTIFACT_SUFFIXES.get(Path(path).suffix.lower(), "checkpoint")


@dataclass
class ArtifactConfig:
    """What the engine needs of a model config, for artifacts without a config.json."""

    vocab_size: int
    max_position_embeddings: int
    eos_token_id: int | None = None


def open_artifact(path: str | os.PathLike, max_seq_len: int | None):
    """The backend for a ``.pte`` or ``.gguf`` file; ``max_seq_len`` is bounded by its context."""
    path = Path(path)
    if not path.is_file():
        raise MobileMoEError(f"{path}: no such file")
    kind = artifact_kind(path)
    if kind == "pte":
        return PteBackend(path, max_seq_len)
    if kind == "gguf":
        return LlamaCppBackend(path, max_seq_len)
    raise MobileMoEError(f"{path}: not a .pte or .gguf file")


# ---------------------------------------------------------------------- ExecuTorch
def pte_cache_length(path: str | os.PathLike) -> int:
    """The static KV-cache length of an exported ``.pte``: the sequence dim of its k/v buffers.

    ``export_module`` plans the mutable k/v caches (``[1, n_kv, max_len, D]``, shared by every
    method) into their own memory arena, the last one of the ``forward`` plan.
    """
    from executorch.exir._serialize._program import deserialize_pte_binary

    try:
        pte = deserialize_pte_binary(Path(path).read_bytes())
    except Exception as exc:  # a truncated or foreign file
        raise MobileMoEError(f"{path}: not a readable ExecuTorch program ({type(exc).__name__})") from None
    program = getattr(pte, "program", pte)
    plan = next((p for p in program.execution_plan if p.name == "forward"), None)
    tensors = [v.val for v in (plan.values if plan else []) if type(v.val).__name__ == "Tensor"
               and v.val.allocation_info is not None]
    arena = max((t.allocation_info.memory_id for t in tensors), default=None)
    lengths = {t.sizes[2] for t in tensors if t.allocation_info.memory_id == arena and len(t.sizes) == 4}
    if len(lengths) != 1 or arena is None or arena < 2:
        raise MobileMoEError(f"{path}: cannot find the static KV cache in this .pte (was it written by "
                             "`mobilemoe export --format executorch`?)")
    return int(lengths.pop())


class PteBackend:
    """An ExecuTorch ``.pte`` from :func:`mobilemoe.export.executorch.export_executorch`."""

    artifact = "pte"

    def __init__(self, path: str | os.PathLike, max_seq_len: int | None = None) -> None:
        from mobilemoe.export.executorch import PteRunner

        cache_len = pte_cache_length(path)
        self.runner = PteRunner(path)
        vocab = int(self.runner.method.metadata.output_tensor_meta(0).sizes()[-1])
        self.config = ArtifactConfig(vocab_size=vocab, max_position_embeddings=cache_len)
        self.max_seq_len = min(max_seq_len or cache_len, cache_len)

    def reset(self) -> None:
        # Nothing to clear: attention masks every slot after the query's position, and each slot
        # before it is rewritten by the new sequence before it is read.
        pass

    def forward(self, ids: Sequence[int], start_pos: int) -> torch.Tensor:
        return self.runner([int(i) for i in ids], start_pos)[-1].float()


# ---------------------------------------------------------------------- llama.cpp
def gguf_metadata(path: str | os.PathLike) -> dict:
    """architecture, context_length and eos_token_id (None if absent) of a GGUF, read in Python
    (no llama.cpp: a bad file is one line here, not a crash)."""
    from gguf import GGUFReader

    try:
        fields = GGUFReader(str(path)).fields
    except Exception as exc:
        raise MobileMoEError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc})") from None

    def value(key: str):
        field = fields.get(key)
        return field.contents() if field is not None else None

    arch = value("general.architecture")
    ctx = value(f"{arch}.context_length")
    if arch is None or ctx is None:
        raise MobileMoEError(f"{path}: GGUF without general.architecture or its context_length")
    return {"arch": arch, "context_length": int(ctx), "eos_token_id": value("tokenizer.ggml.eos_token_id")}


def _llama_child(conn, path: str, n_ctx: int, threads: int) -> None:
    """The child: load the GGUF once, then answer ("forward", ids, start_pos) with ("ok", logits [V])
    and ("reset",) with ("ok", None) until the pipe closes; errors come back as ("error", message)."""
    import resource

    os.dup2(2, 1)  # native prints go to stderr, never into the parent's stdout (--json)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crash leaves no core file behind
    from mobilemoe.export.llamacpp_logits import LlamaCppLogits

    try:
        ll = LlamaCppLogits(path, n_ctx=n_ctx, threads=threads)
        conn.send(("ok", int(ll.n_vocab)))
    except Exception as exc:
        conn.send(("error", str(exc) if isinstance(exc, MobileMoEError) else f"{type(exc).__name__}: {exc}"))
        return
    n_past = 0
    while True:
        try:
            request = conn.recv()
        except EOFError:
            break
        try:
            if request[0] == "reset":
                ll.clear()
                n_past, reply = 0, None
            else:
                _, ids, start_pos = request
                if start_pos != n_past:  # the engine only appends, or restarts after reset()
                    raise MobileMoEError(f"position {start_pos} does not follow the {n_past} cached tokens")
                reply = ll.logits(ids).astype(np.float32)
                n_past += len(ids)
            conn.send(("ok", reply))
        except Exception as exc:
            conn.send(("error", str(exc) if isinstance(exc, MobileMoEError) else f"{type(exc).__name__}: {exc}"))
    ll.close()


class LlamaCppBackend:
    """A GGUF run by llama.cpp (fp32 KV cache) in a persistent child process."""

    artifact = "gguf"

    def __init__(self, path: str | os.PathLike, max_seq_len: int | None = None, threads: int | None = None) -> None:
        meta = gguf_metadata(path)
        self.name = Path(path).name
        ctx = meta["context_length"]
        self.max_seq_len = min(max_seq_len or ctx, ctx)
        threads = threads or max(1, min(4, os.cpu_count() or 1))
        spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch state
        self._conn, child_conn = spawn.Pipe()
        self.process = spawn.Process(target=_llama_child, args=(child_conn, str(path), self.max_seq_len, threads),
                                     daemon=True)
        self.process.start()
        child_conn.close()  # so a dead child reads as EOF here
        vocab = self._reply(f"loading {self.name}")
        eos = meta["eos_token_id"]
        self.config = ArtifactConfig(vocab_size=vocab, max_position_embeddings=ctx,
                                     eos_token_id=int(eos) if eos is not None else None)

    def _reply(self, what: str):
        from mobilemoe.bench.llamacpp import LlamaCppCrash, exit_description

        try:
            tag, payload = self._conn.recv()
        except (EOFError, OSError):
            self.process.join(timeout=10)
            code = self.process.exitcode
            raise LlamaCppCrash(f"llama.cpp crashed ({exit_description(code if code is not None else 1)}) "
                                f"while {what}") from None
        if tag == "error":
            raise MobileMoEError(f"llama.cpp failed while {what}: {payload}")
        return payload

    def _request(self, message: tuple, what: str):
        try:
            self._conn.send(message)
        except (BrokenPipeError, OSError):
            pass  # the child is gone: _reply reports how it died
        return self._reply(what)

    def reset(self) -> None:
        self._request(("reset",), f"resetting {self.name}")

    def forward(self, ids: Sequence[int], start_pos: int) -> torch.Tensor:
        logits = self._request(("forward", [int(i) for i in ids], int(start_pos)), f"decoding {self.name}")
        return torch.from_numpy(logits)

    def close(self) -> None:
        """End the child (it also ends with this process: it is a daemon)."""
        if self.process.is_alive():
            self._conn.close()
            self.process.join(timeout=5)
            if self.process.is_alive():
                self.process.kill()
                self.process.join()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
