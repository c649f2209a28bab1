"""Small shared helpers: atomic file writes with the umask's permissions, output-directory locks, YAML."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path
from typing import Iterator

from mobilemoe.errors import MobileMoEError

LOCK_FILE = ".mobilemoe.lock"


def umask_mode(directory: bool = False) -> int:
    """The mode a plain ``open()`` / ``mkdir()`` would give under the current umask.

    ``tempfile`` creates files 0600 and directories 0700 whatever the umask says; renamed into
    place they would keep that, so a checkpoint written by one user could not be read by a service
    account. Callers chmod their temp files to this mode before the rename.
    """
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def make_temp_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """``tempfile.mkdtemp`` in ``parent`` with the umask's permissions (see :func:`umask_mode`)."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(tmp, umask_mode(directory=True))
    return tmp


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``.

    A crash or exception leaves the old file (if any) untouched and removes the temp file, so a
    reader never sees a half-written checkpoint. The file gets the umask's permissions.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, umask_mode())
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


class OutputLocked(MobileMoEError):
    """Another process is writing the same output directory."""


def _lock_holder(lock: Path) -> str:
    try:
        return lock.read_text(encoding="utf-8").strip() or "unknown"
    except OSError:
        return "unknown"


@contextlib.contextmanager
def output_lock(directory: str | os.PathLike, command: str) -> Iterator[Path]:
    """Hold an exclusive lock on ``directory`` (created if missing) while ``command`` writes it.

    The lock is an ``flock`` on ``DIR/.mobilemoe.lock``, so it dies with its process (no stale locks
    after kill -9); the file records ``pid N (command)`` so a second writer is refused naming the holder.
    """
    import fcntl  # POSIX only; imported here so config.py (shipped with HF exports) still loads on Windows

    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        lock = directory / LOCK_FILE
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise MobileMoEError(f"{directory}: cannot create the output directory's lock file: "
                             f"{exc.strerror or exc}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise OutputLocked(f"{directory}: locked by another writer ({_lock_holder(lock)}); "
                                   f"wait for it to finish or choose another output directory") from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} ({command})\n".encode())
        yield directory
    finally:
        os.close(fd)  # releases the flock; the file stays (removing it would race a waiting writer)


def read_yaml(path: Path, error: type[Exception], what: str, syntax: str = "YAML"):
    """Parse a YAML (or JSON) file, raising ``error`` naming the file if it is missing or malformed."""
    import yaml

    if not path.is_file():
        raise error(f"{path}: no such {what} file")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid {syntax}: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{path}: cannot read {what} file: {exc}") from None
