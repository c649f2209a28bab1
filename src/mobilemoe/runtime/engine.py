"""The generation engine: prefill, then token-by-token decode, over a static KV cache.

The engine owns everything around the forward pass (input checks, sampling, stop tokens,
streaming, timing); the forward itself comes from a backend with three methods
(``reset()``, ``forward(ids, start_pos) -> last-position logits [V]``, ``max_seq_len``). For a
checkpoint directory:

* ``native``: the INT4 model in the C++ extension (:mod:`mobilemoe.runtime.native`), repacked once
  at load, one native call per forward. The fast path.
* ``reference``: :class:`mobilemoe.model.MobileMoEForCausalLM` on the exactly-decoded weights
  (:func:`mobilemoe.checkpoint.load_model`). Slow; the correctness reference and the fallback
  when the extension is not built, and for INT4 checkpoints whose routed experts are grouped along
  ``in`` (``expert_quant_group_axis``), which the native kernels do not read: ``auto`` picks it for
  them (one line on stderr), ``native`` and offloading refuse them.

With an :class:`~mobilemoe.runtime.offload.ExpertOffload` the native backend keeps routed experts on
storage and caches C per MoE layer in RAM (:mod:`mobilemoe.runtime.offload`).

An exported ``.pte`` (ExecuTorch) or ``.gguf`` (llama.cpp, in a child process) gets its backend from
:mod:`mobilemoe.runtime.artifacts`.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol, Sequence

import torch

from mobilemoe.config import MobileMoEConfig
from mobilemoe.errors import MobileMoEError
from mobilemoe.runtime.sampling import Sampler, SamplingParams

if TYPE_CHECKING:
    from mobilemoe.runtime.offload import ExpertOffload


class Backend(Protocol):
    config: MobileMoEConfig
    max_seq_len: int

    def reset(self) -> None: ...

    def forward(self, ids: Sequence[int], start_pos: int) -> torch.Tensor: ...


class ReferenceBackend:
    """model.py with its own KV cache (fp32 for INT4 checkpoints: exact decode)."""

    def __init__(self, path: str | os.PathLike, max_seq_len: int) -> None:
        from mobilemoe.checkpoint import load_model

        self.model = load_model(path).eval()
        self.config = self.model.config
        self.max_seq_len = max_seq_len
        self.cache = self.model.new_cache(1, max_seq_len)

    def reset(self) -> None:
        self.cache.length = 0

    @torch.no_grad()
    def forward(self, ids: Sequence[int], start_pos: int) -> torch.Tensor:
        x = torch.tensor([list(ids)], dtype=torch.long)
        return self.model(x, start_pos, self.cache, last_only=True).logits[0, -1].float()


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)  # generated tokens (stop token excluded)
    stopped_by: str = "length"  # "length" or "stop"
    ttft_s: float = 0.0  # prefill time (time to first token's logits)
    decode_s: float = 0.0
    decode_steps: int = 0  # forward calls after the prefill (the first token comes from its logits)

    @property
    def prefill_tok_s(self) -> float:
        return len(self.prompt_ids) / self.ttft_s if self.ttft_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.decode_steps / self.decode_s if self.decode_s else 0.0


class Engine:
    """Prefill + decode with sampling over one backend. ``Engine.load(path)`` picks the backend."""

    def __init__(self, backend: Backend, tokenizer=None) -> None:
        self.backend = backend
        self.config = backend.config
        self.tokenizer = tokenizer
        self.position = 0  # tokens in the KV cache

    @classmethod
    def load(cls, path: str | os.PathLike, max_seq_len: int | None = None, backend: str = "auto",
             offload: "ExpertOffload | None" = None) -> "Engine":
        """Open a checkpoint directory, an ExecuTorch ``.pte`` or a llama.cpp ``.gguf`` (by suffix).
        ``backend``: auto (native for INT4 when built), native or reference (checkpoints only).
        ``offload``: keep routed experts on storage with a RAM cache (native backend only)."""
        from mobilemoe.checkpoint import CheckpointError
        from mobilemoe.runtime.artifacts import artifact_kind, open_artifact

        path = Path(path)
        _check_max_seq_len(max_seq_len)
        kind = artifact_kind(path)
        if kind != "checkpoint":  # an exported artifact runs in its own runtime, as exported
            if backend != "auto":
                raise MobileMoEError(f"{path}: --backend {backend} applies to checkpoint directories; "
                                     f"a .{kind} runs in its own runtime")
            if offload is not None:
                raise MobileMoEError(f"{path}: expert offloading runs in the native runtime on a checkpoint "
                                     f"directory, not on a .{kind}")
            return cls(open_artifact(path, max_seq_len))
        cfg = MobileMoEConfig.from_json(path / "config.json") if path.is_dir() else None
        if cfg is None:
            raise CheckpointError(f"{path}: not a checkpoint directory")
        max_seq_len = min(max_seq_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        impl = _make_backend(path, cfg, max_seq_len, backend, offload)
        return cls(impl, _load_tokenizer(path))

    # ------------------------------------------------------------------ checks
    def _check_ids(self, ids: Sequence[int], what: str) -> None:
        V = self.config.vocab_size
        bad = [i for i in ids if not 0 <= int(i) < V]
        if bad:
            raise MobileMoEError(f"{what}: token ids out of the vocabulary [0, {V}): {bad[:8]}")

    def _check_room(self, n_new: int) -> None:
        if self.position + n_new > self.backend.max_seq_len:
            raise MobileMoEError(
                f"context limit exceeded: {self.position} cached + {n_new} new tokens > "
                f"{self.backend.max_seq_len} (max_seq_len; the model allows {self.config.max_position_embeddings})")

    # ------------------------------------------------------------------ forward steps
    def reset(self) -> None:
        self.backend.reset()
        self.position = 0

    def prefill(self, ids: Sequence[int]) -> torch.Tensor:
        """Append ``ids`` to the cache; return the logits [V] after the last one."""
        if len(ids) == 0:
            raise MobileMoEError("empty prompt: give at least one token")
        self._check_ids(ids, "prompt")
        self._check_room(len(ids))
        logits = self.backend.forward(ids, self.position)
        self.position += len(ids)
        return logits

    def decode(self, token: int) -> torch.Tensor:
        return self.prefill([token])

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise MobileMoEError("this model has no tokenizer (a checkpoint without tokenizer.json, or an "
                                 "exported artifact): pass token ids instead of text")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:  # lone surrogates: how Python carries undecodable input bytes
            raise MobileMoEError(f"prompt text: not valid Unicode at character {exc.start} (a lone surrogate; "
                                 "was the input valid UTF-8?)") from None
        return self.tokenizer.encode(text)

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int = 64,
                 sampling: SamplingParams | None = None, stop_ids: Sequence[int] = (),
                 on_token: Callable[[int], None] | None = None, keep_cache: bool = False) -> GenerationResult:
        """Generate after ``prompt_ids`` (appended to the cache if ``keep_cache``, else from empty).

        Checks the whole request fits before any work, so a too-long request fails at once.
        """
        if max_new_tokens < 0:
            raise MobileMoEError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if not keep_cache:
            self.reset()
        self._check_room(len(prompt_ids) + max(max_new_tokens - 1, 0))
        sampler = Sampler(sampling or SamplingParams())
        result = GenerationResult(prompt_ids=list(prompt_ids))
        stops = set(stop_ids)
        t0 = time.perf_counter()
        logits = self.prefill(prompt_ids)
        result.ttft_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(max_new_tokens):
            token = sampler(logits)
            if token in stops:
                result.stopped_by = "stop"
                break
            result.ids.append(token)
            if on_token is not None:
                on_token(token)
            if i + 1 < max_new_tokens:
                logits = self.decode(token)
                result.decode_steps += 1
        result.decode_s = time.perf_counter() - t0
        return result


def _check_max_seq_len(max_seq_len) -> None:
    if max_seq_len is not None and (isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int)
                                    or max_seq_len < 1):
        raise MobileMoEError(f"max_seq_len: expected a positive number of tokens, got {max_seq_len!r}")


def _load_tokenizer(path: Path):
    if not (path / "tokenizer.json").exists():
        return None
    from mobilemoe.data.tokenizer import Tokenizer

    return Tokenizer.load(path)


_NOTED_REFERENCE: set[str] = set()  # checkpoints already told (once per process) they run on the reference


def _make_backend(path: Path, cfg: MobileMoEConfig, max_seq_len: int, backend: str,
                  offload: "ExpertOffload | None" = None) -> Backend:
    if backend not in ("auto", "native", "reference"):
        raise MobileMoEError(f"unknown backend {backend!r}: choose auto, native or reference")
    from mobilemoe.runtime.native import layout_problem

    layout = layout_problem(path, cfg)
    if layout is not None and (offload is not None or backend == "native"):
        what = "expert offloading runs in the native runtime" if offload is not None else "--backend native"
        raise MobileMoEError(f"{layout} ({what}): use --backend reference without offloading, export it "
                             f"with `mobilemoe export gguf`, or quantize its float checkpoint with "
                             f"expert_quant_group_axis 'out'")
    if layout is not None and backend == "auto":
        if str(path) not in _NOTED_REFERENCE:
            _NOTED_REFERENCE.add(str(path))
            print(f"{layout}: using the reference (PyTorch) backend", file=sys.stderr)
        return ReferenceBackend(path, max_seq_len)
    if offload is not None:  # only the native runtime offloads: its checks below then apply
        if backend == "reference":
            raise MobileMoEError(f"{path}: expert offloading runs in the native runtime, not the reference backend")
        backend = "native"
    if backend == "reference":
        return ReferenceBackend(path, max_seq_len)
    from mobilemoe.runtime import native

    if not cfg.is_quantized:
        if backend == "native":
            raise MobileMoEError(f"{path}: the native runtime runs INT4 checkpoints (quantization.format "
                                 f"'mobilemoe-int4-g32'); this one is float. Run `mobilemoe quantize {path} OUT`.")
        return ReferenceBackend(path, max_seq_len)
    if not native.is_available():
        if backend == "native":
            raise MobileMoEError(f"native kernels unavailable: {native.unavailable_reason()}")
        return ReferenceBackend(path, max_seq_len)
    return native.NativeBackend(path, max_seq_len, offload)
