"""Argument helpers shared by several commands."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def add_model_config_args(parser: argparse.ArgumentParser) -> None:
    """``--preset NAME`` or ``--config PATH`` (exactly one)."""
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--preset", help="a built-in preset name (see `mobilemoe info --list`)")
    group.add_argument("--config", help="path to a config.json (or a checkpoint directory)")


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2)
    sys.stdout.write("\n")


def number_arg(text: str) -> float:
    """argparse ``type=`` for a plain number, refused in argparse's own one-line error otherwise."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
