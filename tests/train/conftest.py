"""Fixtures for the trainer tests (helpers live in trainutil.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))  # make trainutil importable from the tests

from trainutil import text_token_array


@pytest.fixture
def text_tokens() -> np.ndarray:
    return text_token_array()
