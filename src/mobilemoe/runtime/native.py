"""The native INT4 model (C++ extension ``mobilemoe._C``): placeholder until the native forward lands.

``is_available()`` is False until the extension exposes the full-model forward, so the engine falls
back to the reference backend and says so.
"""

from __future__ import annotations


def _lib():
    try:
        from mobilemoe import _C
    except ImportError as exc:
        return None, f"the extension mobilemoe._C is not built ({exc})"
    if not hasattr(_C, "model_forward"):
        return None, "this build of mobilemoe._C has no native model forward"
    return _C, ""


def is_available() -> bool:
    return _lib()[0] is not None


def unavailable_reason() -> str:
    return _lib()[1]
