"""``mobilemoe`` command line: a thin shell over the package.

Each sub-command lives in ``mobilemoe/commands/<name>.py`` and exposes ``register(subparsers)``,
which adds its parser and sets ``func``. Heavy imports happen inside the command functions so
``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Callable

from mobilemoe.errors import MobileMoEError

# Order here is the order in `mobilemoe --help`.
COMMAND_MODULES = [
    "info",
    "demo",
    "quantize",
    "generate",
    "serve",
    "bench",
    "train",
    "eval",
    "plan",
    "decide",
    "sweep",
    "remoe",
    "export",  # also registers `import` (mobilemoe/commands/import_.py)
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mobilemoe",
        description="On-device Mixture-of-Experts LMs: design, train, quantize to INT4, run, ReMoE, evaluate, export.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"mobilemoe.commands.{name}").register(sub)
    return parser


def describe_input_error(exc: BaseException) -> str | None:
    """One line for an error that bad files or disks cause (None for a bug, which keeps its traceback).

    Commands raise :class:`MobileMoEError` for what they validate; this is the net under them, so an
    unreadable file, a full disk or a corrupt safetensors/JSON file never prints a traceback.
    """
    if isinstance(exc, MobileMoEError):
        return str(exc)
    if isinstance(exc, OSError):
        where = exc.filename if exc.filename is not None else "file system"
        return f"{where}: {exc.strerror or exc}"
    if isinstance(exc, json.JSONDecodeError):
        return f"not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}"
    if isinstance(exc, UnicodeDecodeError):
        return f"not valid UTF-8 text (byte {exc.start}): {exc.reason}"
    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover - safetensors is a dependency
        return None
    if isinstance(exc, SafetensorError):
        return f"not a valid safetensors file: {exc}"
    return None


def run_reporting_errors(prog: str, fn: Callable[[], int | None]) -> int:
    """``fn()``'s exit code; an input error prints ``PROG: error: ...`` (one line) and gives 2,
    Ctrl-C gives 130, and anything :func:`describe_input_error` does not know keeps its traceback."""
    try:
        return int(fn() or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        message = describe_input_error(exc)
        if message is None:
            raise
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_reporting_errors(f"mobilemoe {args.command}", lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
