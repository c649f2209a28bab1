"""Perplexity of a text with a sliding window, and bits per byte (comparable across tokenizers).

The text is encoded as one document behind the prefix token (EOS). Windows of ``window`` tokens
start every ``stride`` tokens; each window scores only the targets no earlier window scored, so every
token is predicted exactly once and, after the first window, with at least ``window - stride``
tokens of context. ``stride == window`` gives (nearly) disjoint windows (fast, pessimistic); a smaller stride
is slower and closer to the model's true long-context loss. When the text fits in one window the
result equals a single full forward.

``bits_per_byte = total_nll_nats / ln(2) / utf8_bytes(text)``: it divides by the text's bytes, not
its tokens, so models with different tokenizers compare fairly.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from mobilemoe.data.readers import DataError, decode_utf8
from mobilemoe.eval.lm import EvalError, EvalLM, _progress


@dataclass
class PerplexityResult:
    tokens: int  # predicted tokens
    bytes: int  # UTF-8 bytes of the scored text
    nll: float  # total negative log-likelihood, nats
    loss: float  # mean nll per token, nats
    ppl: float  # exp(loss)
    bits_per_byte: float
    windows: int
    truncated: bool = False  # stopped early by max_windows (then bytes are the covered fraction)

    def to_dict(self) -> dict:
        return asdict(self)


def window_spans(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first_target)`` per window over ``n`` token ids (targets are ids 1..n-1).

    The forward sees ``ids[begin:end]`` and scores targets ``first_target .. end-1``. Windows start
    ``stride`` tokens apart, but never past the first unscored target minus one (a window's first
    token has no prediction), so ``stride == window`` means windows overlapping by one token.
    """
    if window < 2:
        raise EvalError(f"window must be >= 2 tokens, got {window}")
    if not 1 <= stride <= window:
        raise EvalError(f"stride must be in [1, window], got stride {stride} for window {window}")
    spans, scored_to, begin = [], 1, 0
    while scored_to < n:
        end = min(begin + window, n)
        if end > scored_to:
            spans.append((begin, end, scored_to))
            scored_to = end
        if end == n:
            break
        # the next window's first token is context only, so it must already be scored
        begin = min(begin + stride, scored_to - 1)
    return spans


def perplexity_ids(lm: EvalLM, ids: list[int], window: int | None = None, stride: int | None = None,
                   max_windows: int | None = None) -> tuple[float, int, int, bool]:
    """(total nll, predicted tokens, windows run, truncated) of token ids (ids[0] is context only)."""
    window = min(window or lm.max_length, lm.max_length)
    stride = stride or window
    spans = window_spans(len(ids), window, stride)
    truncated = max_windows is not None and len(spans) > max_windows
    if truncated:
        spans = spans[:max_windows]
    nll, count = 0.0, 0
    bar = _progress(len(spans), "perplexity", lm.progress)
    for begin, end, first in spans:
        lp = lm.token_logprobs(ids[begin:end])  # lp[j] = log p(ids[begin + 1 + j])
        part = lp[first - begin - 1:]
        nll -= float(part.sum())
        count += part.numel()
        bar.update(1)
    bar.close()
    return nll, count, len(spans), truncated


def perplexity(lm: EvalLM, text: str, window: int | None = None, stride: int | None = None,
               max_windows: int | None = None) -> PerplexityResult:
    """Sliding-window perplexity of ``text`` (see the module docstring)."""
    if not text:
        raise EvalError("perplexity: empty text")
    ids = [lm.prefix_token_id] + lm.encode(text)
    if len(ids) < 2:
        raise EvalError("perplexity: text encodes to no tokens")
    nll, count, nwin, truncated = perplexity_ids(lm, ids, window, stride, max_windows)
    n_bytes = len(text.encode("utf-8"))
    if truncated:  # bytes of the covered prefix: decode exactly the scored tokens
        n_bytes = len(lm.tokenizer.decode(ids[1:1 + count]).encode("utf-8"))
    loss = nll / max(count, 1)
    return PerplexityResult(tokens=count, bytes=n_bytes, nll=nll, loss=loss, ppl=math.exp(min(loss, 700.0)),
                            bits_per_byte=nll / math.log(2) / max(n_bytes, 1), windows=nwin, truncated=truncated)


def read_text(path: str | os.PathLike) -> str:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    text = decode_utf8(path.read_bytes(), path)
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    return text


def perplexity_file(lm: EvalLM, path: str | os.PathLike, window: int | None = None, stride: int | None = None,
                    max_windows: int | None = None) -> PerplexityResult:
    """:func:`perplexity` of a UTF-8 text file (the whole file is one document)."""
    return perplexity(lm, read_text(path), window, stride, max_windows)
