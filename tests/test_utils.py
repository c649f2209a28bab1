"""mobilemoe.utils: atomic writes keep the umask's permissions; output directories lock out a second writer."""

from __future__ import annotations

import multiprocessing as mp
import os
import stat

import pytest

from mobilemoe.utils import LOCK_FILE, OutputLocked, atomic_write_text, make_temp_dir, output_lock


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_write_keeps_umask_mode(tmp_path, umask_022):
    """Probe: files written with atomic_write_* ended up 0600 (the temp file's mode)."""
    atomic_write_text(tmp_path / "config.json", "{}\n")
    assert _mode(tmp_path / "config.json") == 0o644


def test_atomic_write_follows_a_stricter_umask(tmp_path):
    old = os.umask(0o077)
    try:
        atomic_write_text(tmp_path / "secret.json", "{}\n")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "secret.json") == 0o600


def test_temp_dir_keeps_umask_mode(tmp_path, umask_022):
    assert _mode(make_temp_dir(tmp_path, ".tmp-")) == 0o755


def _hold_lock(directory, ready, release):
    with output_lock(directory, "train"):
        ready.set()
        release.wait(30)


def test_second_writer_is_refused_with_the_holders_pid(tmp_path):
    """Probe: two `train` runs into one OUT interleaved their files, both rc 0."""
    ctx = mp.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(tmp_path, ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        with pytest.raises(OutputLocked, match=rf"locked by another writer \(pid {holder.pid} \(train\)\)"):
            with output_lock(tmp_path, "quantize"):
                pass
    finally:
        release.set()
        holder.join(30)
    with output_lock(tmp_path, "quantize"):  # free again once the holder has exited
        assert (tmp_path / LOCK_FILE).read_text().startswith(f"pid {os.getpid()} (quantize)")


def test_lock_in_the_same_process_is_exclusive(tmp_path):
    with output_lock(tmp_path, "train"):
        with pytest.raises(OutputLocked):
            with output_lock(tmp_path, "train"):
                pass


def test_lock_on_an_unwritable_place_is_one_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(Exception, match="cannot create the output directory's lock file"):
        with output_lock(tmp_path / "file" / "out", "train"):
            pass
