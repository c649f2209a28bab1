"""Shared pieces of the exporters."""

from __future__ import annotations

from mobilemoe.errors import MobileMoEError


class ExportError(MobileMoEError, ValueError):
    """The checkpoint uses a feature the export target cannot represent (the message names it)."""


def unsupported(target: str, feature: str, why: str = "") -> ExportError:
    tail = f": {why}" if why else ""
    return ExportError(f"cannot export to {target}: the checkpoint uses {feature}{tail}")
