"""Sharding: determinism across worker counts, EOS separation, resume after an interrupted run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mobilemoe.data import DataError, load_index, shard_documents
from mobilemoe.data.shards import INDEX_NAME, token_dtype

SHARD_CHARS = 3000  # ~40 docs -> several shards


def shard(docs, tokenizer, out, **kw):
    kw.setdefault("workers", 1)
    return shard_documents(docs, tokenizer, out, source="test docs", shard_chars=SHARD_CHARS, progress=False, **kw)


def shard_bytes(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_sharding_is_deterministic_for_any_worker_count(tokenizer, tmp_path, make_docs):
    docs = make_docs(60)
    one = shard(docs, tokenizer, tmp_path / "one", workers=1)
    two = shard(docs, tokenizer, tmp_path / "two", workers=2)
    assert len(one.shards) >= 3 and one.complete
    assert shard_bytes(tmp_path / "one") == shard_bytes(tmp_path / "two")
    assert one == two  # directory is not compared
    assert one.dtype == "uint16" and one.tokenizer_sha256 == tokenizer.fingerprint


def test_documents_are_separated_by_eos(tokenizer, tmp_path, make_docs):
    docs = make_docs(60)
    index = shard(docs, tokenizer, tmp_path)
    tokens = np.concatenate(index.arrays())
    assert len(tokens) == index.total_tokens
    assert tokens[-1] == tokenizer.eos_id
    pieces = np.split(tokens, np.flatnonzero(tokens == tokenizer.eos_id) + 1)[:-1]
    assert [tokenizer.decode(p[:-1].tolist()) for p in pieces] == docs
    assert sum(s.docs for s in index.shards) == len(docs)


def test_resume_after_interrupted_run(tokenizer, tmp_path, make_docs):
    docs = make_docs(60)
    ref = shard(docs, tokenizer, tmp_path / "ref")
    # Simulate a run killed after two shards: the index lists 2 shards and is not complete, a later
    # shard file is missing, another is half-written, and a temp file is left behind.
    out = tmp_path / "out"
    shard(docs, tokenizer, out)
    data = json.loads((out / INDEX_NAME).read_text())
    data["shards"], data["complete"] = data["shards"][:2], False
    (out / INDEX_NAME).write_text(json.dumps(data))
    (out / ref.shards[2].file).unlink()
    (out / ref.shards[3].file).write_bytes(b"\x00\x01")
    (out / ".shard_00002.bin.xyz.tmp").write_bytes(b"junk")
    with pytest.raises(DataError, match="sharding is incomplete"):
        load_index(out)

    seen = []

    def counting(docs):
        for d in docs:
            seen.append(d)
            yield d

    resumed = shard(counting(docs), tokenizer, out, workers=2)
    assert resumed == ref
    for info in ref.shards:
        assert (out / info.file).read_bytes() == (tmp_path / "ref" / info.file).read_bytes()
    assert load_index(out) == ref

    # A complete index is returned without reading the documents at all.
    def exploding():
        raise AssertionError("documents were read again")
        yield

    assert shard(exploding(), tokenizer, out) == ref


def test_truncated_recorded_shard_is_redone(tokenizer, tmp_path, make_docs):
    docs = make_docs(60)
    ref = shard(docs, tokenizer, tmp_path)
    before = shard_bytes(tmp_path)
    (tmp_path / ref.shards[1].file).write_bytes(b"\x00\x00")
    assert shard(docs, tokenizer, tmp_path) == ref
    assert shard_bytes(tmp_path) == before


def test_settings_mismatch_is_refused(tokenizer, tmp_path, make_docs):
    shard(make_docs(10), tokenizer, tmp_path)
    with pytest.raises(DataError, match="different settings"):
        shard_documents(make_docs(10), tokenizer, tmp_path, source="other", shard_chars=SHARD_CHARS, progress=False)


def test_no_documents_and_dtype(tokenizer, tmp_path, make_docs):
    with pytest.raises(DataError, match="no documents"):
        shard([], tokenizer, tmp_path)
    assert token_dtype(65536) == "uint16" and token_dtype(65537) == "uint32"
