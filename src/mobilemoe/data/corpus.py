"""The embedded default corpus: the Python standard library's own ``.py`` sources.

Every Python install carries ~14 MB of real, varied, permissively licensed code, so a model can be
trained end to end with nothing downloaded. We take the ``.py`` files under
``sysconfig.get_paths()["stdlib"]`` and skip:

* ``site-packages``/``dist-packages`` (third-party code, differs per machine),
* test directories (``test``, ``tests``, ``idle_test``) by default: they are about half the files,
  very repetitive, and include deliberately mis-encoded files; pass ``include_tests=True`` to keep them,
* ``__pycache__`` and files that are empty or not valid UTF-8.

The train/validation split is by file and deterministic: a file is in validation when the SHA-256 of
its path relative to the stdlib root falls below ``val_fraction``. It does not depend on the file
order, the machine or ``limit``, so the same file always lands in the same split.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from mobilemoe.data.readers import DataError, iter_source_files

SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
TEST_DIRS = frozenset({"test", "tests", "idle_test"})


@dataclass(frozen=True)
class CorpusSplit:
    """Files of a corpus split by file into train and validation (paths are absolute, sorted)."""

    root: Path
    train: list[Path] = field(default_factory=list)
    validation: list[Path] = field(default_factory=list)

    def describe(self, split: str) -> str:
        """A short source description for shard indexes, e.g. ``stdlib:/usr/lib/python3.11 train (780 files)``."""
        return f"stdlib:{self.root} {split} ({len(self.files(split))} files)"

    def files(self, split: str) -> list[Path]:
        """The file list of ``split`` (``"train"`` or ``"validation"``)."""
        if split not in ("train", "validation"):
            raise DataError(f"unknown corpus split {split!r} (expected 'train' or 'validation')")
        return self.train if split == "train" else self.validation

    def documents(self, split: str) -> Iterator[str]:
        """Yield the text of each file in ``split`` (empty and non-UTF-8 files are skipped)."""
        return iter_source_files(self.files(split), skip_undecodable=True)


def stdlib_root() -> Path:
    """Directory of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def list_source_files(root: Path, include_tests: bool = False) -> list[Path]:
    """Sorted ``.py`` files under ``root``, without third-party, cache and (optionally) test dirs."""
    skip = SKIP_DIRS if include_tests else SKIP_DIRS | TEST_DIRS
    files = [p for p in root.rglob("*.py") if p.is_file() and not skip.intersection(p.relative_to(root).parts[:-1])]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _split_key(root: Path, path: Path) -> float:
    """A number in [0, 1) fixed by the file's relative path (stable across machines and runs)."""
    digest = hashlib.sha256(path.relative_to(root).as_posix().encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_by_file(root: Path, files: list[Path], val_fraction: float = 0.02) -> CorpusSplit:
    """Split ``files`` into train/validation by a hash of each relative path.

    If the hash puts no file in validation but there are at least two files, the file with the
    smallest key goes there, so tiny corpora still get a (non-empty) validation set.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    keys = {p: _split_key(root, p) for p in files}
    validation = [p for p in files if keys[p] < val_fraction]
    if not validation and val_fraction > 0 and len(files) >= 2:
        validation = [min(files, key=keys.__getitem__)]
    chosen = set(validation)
    return CorpusSplit(root, [p for p in files if p not in chosen], validation)


def stdlib_corpus(val_fraction: float = 0.02, include_tests: bool = False, limit: int | None = None) -> CorpusSplit:
    """The standard-library corpus split by file. ``limit`` keeps only the first N files (for tests)."""
    root = stdlib_root()
    files = list_source_files(root, include_tests=include_tests)
    if not files:
        raise DataError(f"{root}: no standard-library .py files found")
    return split_by_file(root, files[:limit] if limit else files, val_fraction)
