"""``mobilemoe`` command line: a thin shell over the package.

Each sub-command lives in ``mobilemoe/commands/<name>.py`` and exposes ``register(subparsers)``,
which adds its parser and sets ``func``. Heavy imports happen inside the command functions so
``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from mobilemoe.errors import MobileMoEError

# Order here is the order in `mobilemoe --help`.
COMMAND_MODULES = [
    "info",
    "demo",
    "quantize",
    "generate",
    "bench",
    "train",
    "eval",
    "plan",
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MobileMoEError as exc:
        print(f"mobilemoe {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mobilemoe {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
