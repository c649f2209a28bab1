"""Suite-wide fixtures: seeded torch, and the one rule for tests that need what a fresh clone may lack.

Tests that need the real datasets (``$MOBILEMOE_DATA_DIR``, else ``shared/data`` in or beside the checkout,
see :func:`mobilemoe.eval.tasks.default_data_dir`) declare it with the ``shared_data`` marker or fixture and are
skipped with a reason naming the missing path on a fresh clone without them. Tests that run code in the
HumanEval sandbox carry the ``sandbox`` marker and skip where bubblewrap is missing or cannot make namespaces
(``make setup`` installs it when it can). Set ``MOBILEMOE_REQUIRE_ALL=1`` (CI does, where ``../shared`` and
bubblewrap exist) to turn those skips into failures, so a lost data folder or sandbox cannot pass silently.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest
import torch

REQUIRE_ENV = "MOBILEMOE_REQUIRE_ALL"


def shared_data_dir() -> Path:
    """The shared datasets folder the library itself would read."""
    from mobilemoe.eval.tasks import default_data_dir

    return default_data_dir()


def require_shared_data(*rel: str) -> Path:
    """``shared_data_dir()`` after checking ``rel`` paths exist in it; skip (or fail, see module doc) if not."""
    root = shared_data_dir()
    missing = [p for p in rel if not (root / p).exists()]
    if missing:
        msg = f"shared datasets not found: {', '.join(str(root / p) for p in missing)} (set $MOBILEMOE_DATA_DIR)"
        _skip_or_fail(msg)
    return root


def _skip_or_fail(msg: str) -> None:
    if os.environ.get(REQUIRE_ENV, "") not in ("", "0"):
        pytest.fail(f"{msg}; ${REQUIRE_ENV} is set", pytrace=False)
    pytest.skip(msg)


def require_sandbox() -> None:
    """Skip (or fail, see module doc) unless the HumanEval sandbox (bubblewrap) works here."""
    from mobilemoe.eval.sandbox import SandboxUnavailable, require_sandbox as check

    try:
        check()
    except SandboxUnavailable as exc:
        _skip_or_fail(f"HumanEval sandbox unavailable: {exc}")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "shared_data(*paths): needs these paths under the shared datasets folder; skipped when absent")
    config.addinivalue_line("markers", "sandbox: runs code in the bubblewrap sandbox; skipped when it is unavailable")


def pytest_runtest_setup(item):
    for mark in item.iter_markers("shared_data"):
        require_shared_data(*mark.args)
    if item.get_closest_marker("sandbox"):
        require_sandbox()


@pytest.fixture
def shared_data() -> Callable[..., Path]:
    """``shared_data("arc_easy/arc_easy.jsonl")`` -> the data folder, or skip: for paths known only in the test."""
    return require_shared_data


@pytest.fixture
def one_thread():
    """Tiny matmuls run fastest (and steadiest on a shared machine) on one intra-op thread."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
