"""The embedded stdlib corpus: file selection and the deterministic by-file split."""

from __future__ import annotations

from mobilemoe.data import split_by_file, stdlib_corpus, stdlib_root


def test_stdlib_subset_split_is_deterministic_and_disjoint():
    a = stdlib_corpus(limit=60)
    b = stdlib_corpus(limit=60)
    assert a == b
    assert a.train and a.validation
    assert not set(a.train) & set(a.validation)
    assert len(a.train) + len(a.validation) == 60
    for path in a.train + a.validation:
        parts = path.relative_to(stdlib_root()).parts
        assert path.suffix == ".py" and not {"site-packages", "test", "tests"} & set(parts)
    docs = list(a.documents("validation"))
    assert docs and all(isinstance(d, str) and d for d in docs)
    assert "stdlib:" in a.describe("train")


def test_split_depends_only_on_relative_path(tmp_path):
    names = [f"m{i}.py" for i in range(300)]
    files = [tmp_path / n for n in names]
    split = split_by_file(tmp_path, files, val_fraction=0.1)
    # Same relative names under another root, in another order: same assignment.
    other = tmp_path / "elsewhere"
    again = split_by_file(other, [other / n for n in reversed(names)], val_fraction=0.1)
    assert sorted(p.name for p in split.validation) == sorted(p.name for p in again.validation)
    assert 10 <= len(split.validation) <= 55  # ~10% of 300
