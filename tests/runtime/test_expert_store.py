"""The expert store's integrity: a fingerprint of its checkpoint, a sha256 per record, clear errors.

Pure Python (the store is written and checked without the native kernels)."""

import json
import os
import shutil

import pytest

from mobilemoe.config import MobileMoEConfig
from mobilemoe.errors import MobileMoEError
from mobilemoe.runtime import offload
from mobilemoe.runtime.offload import STORE_FILE, STORE_FORMAT, STORE_INDEX, ensure_store, open_store


def _cfg(ckpt) -> MobileMoEConfig:
    return MobileMoEConfig.from_json(ckpt / "config.json")


def _bin(d) -> bytes:
    return (d / STORE_FILE).read_bytes()


@pytest.fixture(scope="module")
def other_ckpt(make_int4_checkpoint):
    """Same preset and shapes as ``int4_ckpt``, other weights."""
    return make_int4_checkpoint("tiny-moe", seed=2)


def test_corrupted_record_is_found_and_rewritten(int4_ckpt, tmp_path, capsys):
    d, index = ensure_store(int4_ckpt, _cfg(int4_ckpt), tmp_path / "s")
    good = _bin(d)
    rec = index["layers"]["1"][5]
    with open(d / STORE_FILE, "r+b") as fh:  # flip one byte in place: same size, same index
        fh.seek(rec["offset"] + 100)
        byte = fh.read(1)
        fh.seek(rec["offset"] + 100)
        fh.write(bytes([byte[0] ^ 0xFF]))
    assert _bin(d) != good
    ensure_store(int4_ckpt, _cfg(int4_ckpt), d)
    assert "layer 1 expert 5 fails its sha256 checksum; rewriting it" in capsys.readouterr().err
    assert _bin(d) == good


def test_truncated_store_and_tampered_offsets_are_rewritten(int4_ckpt, tmp_path, capsys):
    d, index = ensure_store(int4_ckpt, _cfg(int4_ckpt), tmp_path / "s")
    good = _bin(d)
    os.truncate(d / STORE_FILE, len(good) - 10)
    ensure_store(int4_ckpt, _cfg(int4_ckpt), d)
    assert "lies outside the file" in capsys.readouterr().err and _bin(d) == good
    index = json.loads((d / STORE_INDEX).read_text())
    index["layers"]["1"][0]["offset"] = index["layers"]["1"][1]["offset"]  # two experts, one record
    (d / STORE_INDEX).write_text(json.dumps(index))
    ensure_store(int4_ckpt, _cfg(int4_ckpt), d)
    assert "layer 1 expert 0 fails its sha256 checksum" in capsys.readouterr().err


def test_store_of_other_weights_is_rewritten(int4_ckpt, other_ckpt, tmp_path, capsys):
    """Same shapes, other weights (a re-quantized or re-trained checkpoint): the fingerprint, not the
    shapes, decides."""
    _, mine = ensure_store(int4_ckpt, _cfg(int4_ckpt), tmp_path / "s")
    stale = tmp_path / "stale"
    shutil.copytree(tmp_path / "s", stale)
    _, fresh = ensure_store(other_ckpt, _cfg(other_ckpt), stale)
    assert "fingerprint differs" in capsys.readouterr().err
    assert fresh["source"]["experts_sha256"] != mine["source"]["experts_sha256"]
    assert _bin(stale) == _bin(ensure_store(other_ckpt, _cfg(other_ckpt), tmp_path / "o")[0])


def test_unchanged_checkpoint_is_not_rehashed(int4_ckpt, tmp_path, monkeypatch, capsys):
    """Once the checkpoint's files are older than the timestamp granularity, size/mtime/ctime/inode
    stand for its content; a changed stat makes the content hash decide again."""
    monkeypatch.setattr(offload, "RACY_NS", 0)
    d, index = ensure_store(int4_ckpt, _cfg(int4_ckpt), tmp_path / "s")
    assert index["source"]["files"][0][0] == "model.safetensors"
    real = offload.checkpoint_fingerprint
    calls = []
    monkeypatch.setattr(offload, "checkpoint_fingerprint", lambda c: calls.append(c) or real(c))
    ensure_store(int4_ckpt, _cfg(int4_ckpt), d)
    assert calls == []
    st = (int4_ckpt / "model.safetensors").stat()
    os.utime(int4_ckpt / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns))  # new ctime, same bytes
    ensure_store(int4_ckpt, _cfg(int4_ckpt), d)
    assert len(calls) == 1 and capsys.readouterr().err == ""  # same content: kept, key refreshed
    ensure_store(int4_ckpt, _cfg(int4_ckpt), d)
    assert len(calls) == 1


def test_recently_written_checkpoint_is_always_hashed(int4_ckpt, tmp_path):
    """A file changed within the timestamp granularity could change again without a new mtime."""
    _, index = ensure_store(int4_ckpt, _cfg(int4_ckpt), tmp_path / "s")  # fixtures are seconds old
    if index["source"]["files"] is not None:
        pytest.skip("checkpoint older than RACY_NS")
    assert len(index["source"]["experts_sha256"]) == 64


def test_store_formats(int4_ckpt, tmp_path):
    """Stores of earlier versions (v1, v2: no checksums) are rewritten; a foreign index is refused."""
    cfg = _cfg(int4_ckpt)
    d, index = ensure_store(int4_ckpt, cfg, tmp_path / "s")
    assert STORE_FORMAT == "mobilemoe-expert-store-v3"
    for old in ("mobilemoe-expert-store-v1", "mobilemoe-expert-store-v2"):
        (d / STORE_INDEX).write_text(json.dumps({**index, "format": old}))
        assert ensure_store(int4_ckpt, cfg, d)[1]["format"] == STORE_FORMAT
    (d / STORE_INDEX).write_text(json.dumps({**index, "layers": [1, 2]}))
    with pytest.raises(MobileMoEError, match="field 'layers'"):
        ensure_store(int4_ckpt, cfg, d)


def test_unwritable_store_is_one_clear_error(int4_ckpt, tmp_path):
    cfg = _cfg(int4_ckpt)
    (tmp_path / "file").write_text("x")
    with pytest.raises(MobileMoEError, match="is not a directory"):
        ensure_store(int4_ckpt, cfg, tmp_path / "file")
    with pytest.raises(MobileMoEError, match="file/sub: cannot create"):
        ensure_store(int4_ckpt, cfg, tmp_path / "file" / "sub")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes read-only directories")
def test_read_only_store(int4_ckpt, tmp_path):
    """A valid store in a read-only directory is used as is; one that must be written is one line."""
    cfg = _cfg(int4_ckpt)
    d, _ = ensure_store(int4_ckpt, cfg, tmp_path / "s")
    (tmp_path / "empty").mkdir()
    for p in (d, tmp_path / "empty"):
        p.chmod(0o555)
    try:
        open_store(int4_ckpt, cfg, d).close()
        with pytest.raises(MobileMoEError, match="empty: the expert store must be .re.written but the directory "
                                                 "is not writable"):
            ensure_store(int4_ckpt, cfg, tmp_path / "empty")
    finally:
        for p in (d, tmp_path / "empty"):
            p.chmod(0o755)


def test_store_is_locked_while_written(int4_ckpt, tmp_path):
    from mobilemoe.utils import output_lock

    with output_lock(tmp_path / "s", "other"):
        with pytest.raises(MobileMoEError, match=rf"locked by another writer \(pid {os.getpid()} \(other\)\)"):
            ensure_store(int4_ckpt, _cfg(int4_ckpt), tmp_path / "s")


def test_native_reads_the_verified_file(int4_ckpt, tmp_path):
    store = open_store(int4_ckpt, _cfg(int4_ckpt), tmp_path / "s")
    try:
        path = store.native_path()
        assert os.path.samefile(path, tmp_path / "s" / STORE_FILE)
        os.replace(tmp_path / "s" / STORE_INDEX, tmp_path / "s" / STORE_FILE)  # renamed over after the check
        assert not os.path.samefile(path, tmp_path / "s" / STORE_FILE)
    finally:
        store.close()
