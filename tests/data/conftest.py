"""Shared fixtures for the data-pipeline tests: a tiny BPE tokenizer and small synthetic documents."""

from __future__ import annotations

import random

import pytest

from mobilemoe.data import Tokenizer, train_bpe


def random_docs(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct pseudo-random documents (random words), so token windows do not repeat."""
    rng = random.Random(seed)
    words = ["def", "return", "self", "import", "class", "for", "in", "if", "else", "x", "y", "lambda", "é", "日本"]
    return [
        f"# doc {i}\n" + " ".join(rng.choice(words) + str(rng.randrange(1000)) for _ in range(rng.randrange(20, 120)))
        for i in range(n)
    ]


@pytest.fixture(scope="session")
def make_docs():
    """The :func:`random_docs` factory (a fixture, so test modules need not import conftest)."""
    return random_docs


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return train_bpe(random_docs(200, seed=123), vocab_size=600)
