"""Run untrusted Python (model-written code + unit tests) behind an OS boundary.

The boundary is `bubblewrap <https://github.com/containers/bubblewrap>`_ (``bwrap``; Debian/Ubuntu:
``apt-get install bubblewrap``). Without a working ``bwrap`` nothing runs: :func:`require_sandbox`
(called by HumanEval before it generates anything) raises :class:`SandboxUnavailable`, one line.

Layers, outermost first:

1. **bwrap** (``--unshare-all --disable-userns --die-with-parent --new-session``): fresh user, mount,
   pid, network, ipc, uts and cgroup namespaces, so no network (only a private loopback), no view of
   host processes, no nested namespaces. The file system is ``--ro-bind / /``: everything is visible
   read-only (writes fail with ``EROFS`` whatever the path, file descriptor, ``dir_fd``, ``fchdir``,
   child process or C library does them). The only writable place is the work dir, a private
   size-capped tmpfs mounted over an empty host temp dir (nothing written there reaches the host
   disk); ``/dev`` is bwrap's minimal device tree remounted read-only (its tmpfs would otherwise be
   writable and unbounded), ``/proc`` belongs to the new pid namespace. Inside, the program runs as
   uid/gid 65534 with no capabilities. Honest limits: when the parent is root, that uid is host root
   mapped into the namespace, so it can *read* what root can read (it still cannot write, signal or
   connect to anything); the sandbox is as strong as the kernel's namespaces.
   Needs bwrap >= 0.8.0 (``--disable-userns``; Debian 12, Ubuntu 24.04). Checked with 0.8.0 run by
   root and by an unprivileged user (kernel with unprivileged user namespaces); no flag needed
   changing. :func:`require_sandbox` runs a self-test (uid 65534, ``/`` not writable) once per
   ``bwrap`` path and refuses, quoting bwrap's error, if it fails.
2. **Process limits**: ``python -I -B`` (isolated mode) with a minimal environment (no inherited
   variables, ``HOME``/``TMPDIR`` = the work dir); rlimits on CPU seconds, address space, file size,
   open files, core dumps; a wall-clock timeout that SIGKILLs bwrap's process group (bwrap's
   ``--die-with-parent`` and the pid namespace take everything inside down with it); stdout and
   stderr are read with a byte cap and the run is killed when a stream exceeds it, so a flood never
   grows the parent.
3. **A CPython audit hook** (second layer, best effort): refuses writes, removals, renames, links,
   chmods, ``chdir``/``fchdir`` and ``sqlite3.connect`` outside the work dir (``dir_fd`` and open
   descriptors resolved through ``/proc/self/fd``), opening a directory outside it (the source of
   ``dir_fd``/``opener`` tricks), process creation (``fork``, ``exec*``, ``subprocess``,
   ``os.system``, importing ``_posixsubprocess``), signals, sockets and ``ctypes``. Some operations
   have no audit event (``os.open(name, dir_fd=...)``, SQL ``ATTACH``); layer 1 is what stops those.

**Pass marker.** The parent sends a random per-run nonce on stdin; the harness reads it before the
program runs and writes it (to a private dup of stdout) only after the program's top level, i.e.
``check(...)``, returned. A run passes iff the marker arrived and the exit status is 0, so
``raise SystemExit(0)``, ``os._exit(0)`` or printing "passed" before the tests is a failure. The nonce
lives in the same process as the program, so code that deliberately inspects the harness's frames
could forge it; it stops accidental passes, not an adversary (which could also monkeypatch builtins
the tests use: pass@1 of adversarial completions is never meaningful).
"""

from __future__ import annotations

import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from mobilemoe.errors import MobileMoEError

SANDBOX_UID = 65534  # "nobody" inside the user namespace
INSTALL_HINT = "install it with `apt-get install bubblewrap`"

GUARD = r'''
import os, sys
_MARK = sys.stdin.buffer.readline().strip()  # the per-run pass nonce; then stdin is /dev/null
_fd = os.open(os.devnull, os.O_RDONLY)
os.dup2(_fd, 0)
os.close(_fd)
_OUT = os.dup(1)  # the marker goes here, so rebinding sys.stdout cannot swallow or fake it
_ROOT = os.path.realpath(os.getcwd())
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
# event -> ((path index, dir_fd index or None), ...), as CPython 3.9-3.13 report them
_PATH_ARGS = {"os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.mkdir": ((0, 2),),
              "os.rename": ((0, 2), (1, 3)), "os.link": ((0, 2), (1, 3)), "os.symlink": ((1, 2),),
              "os.chmod": ((0, 2),), "os.chown": ((0, 3),), "os.utime": ((0, 3),),
              "os.mkfifo": ((0, 2),), "os.mknod": ((0, 3),), "os.truncate": ((0, None),),
              "os.setxattr": ((0, None),), "os.removexattr": ((0, None),), "os.chflags": ((0, None),),
              "os.chdir": ((0, None),), "shutil.rmtree": ((0, 1),), "shutil.copyfile": ((1, None),),
              "shutil.copytree": ((1, None),), "shutil.move": ((0, None), (1, None)),
              "shutil.chown": ((0, None),)}
_BLOCKED_PREFIXES = ("subprocess.", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "os.forkpty",
                     "os.system", "os.kill", "os.killpg", "os.startfile", "pty.", "socket.connect",
                     "socket.bind", "socket.sendto", "socket.sendmsg", "ctypes.", "os.add_dll_directory",
                     "sys.remote_exec", "os.setuid", "os.setgid", "resource.setrlimit", "resource.prlimit",
                     "signal.pthread_kill", "sqlite3.enable_load_extension", "sqlite3.load_extension",
                     "gc.get_objects", "gc.get_referrers", "gc.get_referents")
_BLOCKED_IMPORTS = {"_posixsubprocess", "_ctypes", "_testcapi", "_testinternalcapi"}

def _real(path, dir_fd=None):
    if isinstance(path, int):  # an open descriptor: where does it point?
        target = os.readlink("/proc/self/fd/%d" % path)
        return target if target.startswith("/") else None  # pipe:[..], socket:[..]: not a path
    p = os.fsdecode(path)
    if not os.path.isabs(p):
        base = os.getcwd() if dir_fd is None or dir_fd < 0 else _real(dir_fd)
        p = os.path.join(base or "/", p)
    return os.path.realpath(p)

def _inside(path, dir_fd=None):
    try:
        real = _real(path, dir_fd if isinstance(dir_fd, int) else None)
    except Exception:
        return False
    return real is None or real == _ROOT or real.startswith(_ROOT + os.sep)

def _deny(what):
    raise PermissionError("sandbox: " + what)

def _hook(event, args):
    if event == "open":
        path, mode, flags = (tuple(args) + (None, None, None))[:3]
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
                  (isinstance(flags, int) and bool(flags & _WRITE_FLAGS))
        opening_dir = not writing and isinstance(path, (str, bytes)) and os.path.isdir(path)  # a dir_fd source
        if (writing or opening_dir) and not _inside(path):
            what = "opening a directory" if opening_dir else "write"
            _deny("%s outside the sandbox directory refused: %r" % (what, path))
    elif event in _PATH_ARGS:
        for i, d in _PATH_ARGS[event]:
            dir_fd = args[d] if d is not None and d < len(args) else None
            if i < len(args) and args[i] is not None and not _inside(args[i], dir_fd):
                _deny("%s outside the sandbox directory refused: %r" % (event, args[i]))
    elif event == "sqlite3.connect":
        db = os.fsdecode(args[0]) if isinstance(args[0], (str, bytes, os.PathLike)) else ""
        if db not in ("", ":memory:") and (db.startswith("file:") or not _inside(db)):
            _deny("sqlite3 database outside the sandbox directory refused: %r" % (db,))
    elif event == "import" and args[0] in _BLOCKED_IMPORTS:
        _deny("importing %s is not allowed" % args[0])
    elif event.startswith(_BLOCKED_PREFIXES):
        _deny("%s is not allowed" % event)

if _HOOK:
    sys.addaudithook(_hook)
del _hook
with open("program.py", encoding="utf-8") as _f:
    _src = _f.read()
del _f
exec(compile(_src, "program.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
# Reached only when the program's top level (the tests' check(...)) returned normally.
try:
    sys.stdout.flush()
except Exception:
    pass
os.write(_OUT, b"\n" + _MARK + b"\n")
'''


class SandboxUnavailable(MobileMoEError):
    """``bwrap`` is missing or does not work here, so untrusted code is not run at all."""


@dataclass
class SandboxResult:
    status: str  # "passed", "failed", "timeout"
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    truncated: bool = False  # a stream exceeded the output cap and the run was killed

    @property
    def passed(self) -> bool:
        return self.status == "passed"


_CHECKED: dict[str, str | None] = {}  # bwrap path -> why its self-test failed (None: it works)


def require_sandbox() -> str:
    """The path of a working ``bwrap``; :class:`SandboxUnavailable` (one line) when there is none."""
    path = shutil.which("bwrap")
    if path is None:
        raise SandboxUnavailable("HumanEval runs model-written code only inside a bubblewrap sandbox, and "
                                 f"`bwrap` is not on PATH; {INSTALL_HINT}")
    if path not in _CHECKED:
        probe = ("import os\nassert os.getuid() == %d, os.getuid()\n"
                 "try:\n    open('/.mobilemoe-sandbox-probe', 'w')\nexcept OSError:\n    pass\n"
                 "else:\n    raise SystemExit('/ is writable')\n" % SANDBOX_UID)
        res = _run(path, probe, timeout=30.0, audit_hook=False)
        why = (res.stderr.strip().splitlines() or [f"exit status {res.returncode}"])[-1]
        _CHECKED[path] = None if res.passed else why
    if _CHECKED[path] is not None:
        raise SandboxUnavailable(f"HumanEval runs model-written code only inside a bubblewrap sandbox, and "
                                 f"{path} failed its self-test ({_CHECKED[path]}); {INSTALL_HINT} "
                                 "on a system that allows unprivileged user namespaces")
    return path


def _limits_code(cpu_s: int, memory_mb: int, file_mb: int, audit_hook: bool) -> str:
    """Child-side resource limits, set before the guard (no preexec_fn: unsafe in a threaded parent)."""
    limits = [("RLIMIT_CPU", cpu_s), ("RLIMIT_AS", memory_mb * 1024 * 1024),
              ("RLIMIT_FSIZE", file_mb * 1024 * 1024), ("RLIMIT_NOFILE", 64), ("RLIMIT_CORE", 0)]
    return ("import os, resource\n"
            f"for _name, _value in {limits!r}:\n"
            "    try:\n"
            "        resource.setrlimit(getattr(resource, _name), (_value, _value))\n"
            "    except (ValueError, OSError, AttributeError):\n"
            "        pass\n"
            "os.umask(0o077)\n"
            f"_HOOK = {bool(audit_hook)!r}\n")


def _bwrap_args(bwrap: str, work: str, program_fd: int, disk_mb: int) -> list[str]:
    return [bwrap, "--unshare-all", "--unshare-user", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID),
            "--disable-userns", "--die-with-parent", "--new-session",
            "--ro-bind", "/", "/", "--dev", "/dev", "--remount-ro", "/dev", "--proc", "/proc",
            "--size", str(disk_mb * 1024 * 1024), "--perms", "0700", "--tmpfs", work,
            "--file", str(program_fd), os.path.join(work, "program.py"), "--chdir", work, "--"]


def _read_capped(proc: subprocess.Popen, cap: int, deadline: float) -> tuple[bytes, bytes, str]:
    """Read stdout/stderr until EOF, the deadline ("timeout") or a stream passing ``cap`` bytes ("truncated")."""
    bufs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    why = ""
    with selectors.DefaultSelector() as sel:
        for fd in bufs:
            sel.register(fd, selectors.EVENT_READ)
        while sel.get_map() and not why:
            left = deadline - time.monotonic()
            if left <= 0:
                why = "timeout"
                break
            for key, _ in sel.select(left):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                buf = bufs[key.fd]
                buf += chunk[: cap - len(buf)]  # never hold more than cap bytes per stream
                if len(buf) >= cap:
                    why = "truncated"
    return bytes(bufs[proc.stdout.fileno()]), bytes(bufs[proc.stderr.fileno()]), why


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # bwrap's group; --die-with-parent + the pid ns do the rest
    except ProcessLookupError:
        pass


def _run(bwrap: str, code: str, timeout: float = 10.0, memory_mb: int = 1024, file_mb: int = 16,
         disk_mb: int = 64, output_limit: int = 4000, output_cap: int = 1 << 20,
         audit_hook: bool = True) -> SandboxResult:
    nonce = secrets.token_hex(16).encode()
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mobilemoe-sandbox-") as work, tempfile.TemporaryFile() as program:
        program.write(code.encode("utf-8"))
        program.flush()
        program.seek(0)
        env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
        guard = _limits_code(int(timeout) + 1, memory_mb, file_mb, audit_hook) + GUARD
        proc = subprocess.Popen(
            _bwrap_args(bwrap, work, program.fileno(), disk_mb) + [sys.executable, "-I", "-B", "-c", guard],
            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True, close_fds=True, pass_fds=(program.fileno(),))
        try:
            try:
                proc.stdin.write(nonce + b"\n")
                proc.stdin.close()
            except BrokenPipeError:  # bwrap failed before reading it; its stderr says why
                pass
            out, err, why = _read_capped(proc, output_cap, start + timeout)
            if not why:
                try:  # streams closed, but the process may still be running
                    proc.wait(timeout=max(0.0, start + timeout - time.monotonic()))
                except subprocess.TimeoutExpired:
                    why = "timeout"
        finally:
            _kill(proc)
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()
    marker = b"\n" + nonce + b"\n"
    passed = not why and proc.returncode == 0 and marker in out
    status = "timeout" if why == "timeout" else "passed" if passed else "failed"
    text_err = err.decode("utf-8", "replace")
    if why == "truncated":
        text_err += f"\nsandbox: output exceeded {output_cap} bytes; the program was killed\n"
    return SandboxResult(status, proc.returncode, out.replace(marker, b"").decode("utf-8", "replace")[-output_limit:],
                         text_err[-output_limit:], time.monotonic() - start, truncated=why == "truncated")


def run_python(code: str, timeout: float = 10.0, memory_mb: int = 1024, file_mb: int = 16,
               output_limit: int = 4000, *, output_cap: int = 1 << 20, disk_mb: int = 64,
               audit_hook: bool = True) -> SandboxResult:
    """Run ``code`` as ``program.py`` in the bwrap sandbox; "passed" iff it ran to its end and exited 0.

    ``output_cap`` bytes per stream are kept (more kills the run: ``truncated``), of which the last
    ``output_limit`` characters are returned; ``disk_mb`` caps the work dir, ``file_mb`` one file.
    ``audit_hook=False`` leaves only the OS layers (for testing that they hold on their own).
    Raises :class:`SandboxUnavailable` when ``bwrap`` is missing or broken.
    """
    return _run(require_sandbox(), code, timeout=timeout, memory_mb=memory_mb, file_mb=file_mb, disk_mb=disk_mb,
                output_limit=output_limit, output_cap=output_cap, audit_hook=audit_hook)
