"""Run untrusted Python (model-written code + unit tests) in a contained subprocess.

Layers, each cheap and none needing privileges:

* a fresh temporary working directory, deleted afterwards; ``HOME`` and ``TMPDIR`` point into it;
* a minimal environment (no inherited variables, so no tokens or proxies leak) and ``python -I -B``
  (isolated mode: no user site, no ``PYTHON*`` variables, no bytecode writes);
* resource limits: CPU seconds, address space, largest file written, open files, no core dumps;
* a wall-clock timeout; the child leads its own process group, which is SIGKILLed on expiry, so an
  infinite loop (or anything it spawned) dies;
* a CPython audit hook (``sys.addaudithook``; it cannot be removed from Python code) installed
  before the program runs, that refuses: opening a file for writing outside the temp dir (symlinks
  resolved), removing/renaming/linking/chmod-ing paths outside it, starting processes (``fork``,
  ``exec*``, ``subprocess``, ``os.system``, ``posix_spawn``), sending signals, sockets
  (``connect``/``bind``) and ``ctypes``. A refused operation raises ``PermissionError`` in the child.

This is containment for benchmark code, not a security boundary against a determined attacker
(use a container or VM for that); it is the same spirit as OpenAI's ``human-eval`` execution guard
but enforced below the library level.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

GUARD = r'''
import os, sys
_ROOT = os.path.realpath(os.getcwd())
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
_PATH_ARGS = {"os.remove": (0,), "os.rename": (0, 1), "os.mkdir": (0,), "os.rmdir": (0,),
              "os.chmod": (0,), "os.chown": (0,), "os.link": (0, 1), "os.symlink": (1,),
              "os.truncate": (0,), "os.utime": (0,), "os.setxattr": (0,), "os.removexattr": (0,),
              "shutil.rmtree": (0,), "shutil.copyfile": (1,), "shutil.copytree": (1,),
              "shutil.move": (0, 1), "shutil.chown": (0,), "os.chdir": (0,), "os.mkfifo": (0,),
              "os.mknod": (0,), "os.chroot": (0,)}
_BLOCKED_PREFIXES = ("subprocess.", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "os.forkpty",
                     "os.system", "os.kill", "os.killpg", "os.startfile", "pty.", "socket.connect",
                     "socket.bind", "socket.sendto", "socket.sendmsg", "ctypes.", "os.add_dll_directory",
                     "sys.remote_exec", "os.setuid", "os.setgid", "resource.setrlimit", "resource.prlimit",
                     "signal.pthread_kill")

def _inside(path):
    if isinstance(path, int):
        return True  # an already-open descriptor
    try:
        p = os.fsdecode(path)
    except Exception:
        return False
    real = os.path.realpath(os.path.join(_ROOT, p))
    return real == _ROOT or real.startswith(_ROOT + os.sep)

def _deny(what):
    raise PermissionError("sandbox: " + what)

def _hook(event, args):
    if event == "open":
        path, mode, flags = (tuple(args) + (None, None, None))[:3]
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
                  (isinstance(flags, int) and bool(flags & _WRITE_FLAGS))
        if writing and not _inside(path):
            _deny("write outside the sandbox directory refused: %r" % (path,))
    elif event in _PATH_ARGS:
        for i in _PATH_ARGS[event]:
            if i < len(args) and args[i] is not None and not _inside(args[i]):
                _deny("%s outside the sandbox directory refused: %r" % (event, args[i]))
    elif event.startswith(_BLOCKED_PREFIXES):
        _deny("%s is not allowed" % event)

sys.addaudithook(_hook)
del _hook
__name__ = "__main__"
with open("program.py", encoding="utf-8") as _f:
    _src = _f.read()
del _f
exec(compile(_src, "program.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
'''


@dataclass
class SandboxResult:
    status: str  # "passed", "failed", "timeout"
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _limits_code(cpu_s: int, memory_mb: int, file_mb: int) -> str:
    """Child-side resource limits, set before the guard (no preexec_fn: unsafe in a threaded parent)."""
    limits = [("RLIMIT_CPU", cpu_s), ("RLIMIT_AS", memory_mb * 1024 * 1024),
              ("RLIMIT_FSIZE", file_mb * 1024 * 1024), ("RLIMIT_NOFILE", 64), ("RLIMIT_CORE", 0)]
    return ("import os, resource\n"
            f"for _name, _value in {limits!r}:\n"
            "    try:\n"
            "        resource.setrlimit(getattr(resource, _name), (_value, _value))\n"
            "    except (ValueError, OSError, AttributeError):\n"
            "        pass\n"
            "os.umask(0o077)\n")


def run_python(code: str, timeout: float = 10.0, memory_mb: int = 1024, file_mb: int = 16,
               output_limit: int = 4000) -> SandboxResult:
    """Run ``code`` as ``program.py`` in a fresh temp dir under the guard; exit status 0 = passed."""
    import time

    with tempfile.TemporaryDirectory(prefix="mobilemoe-sandbox-") as tmp:
        Path(tmp, "program.py").write_text(code, encoding="utf-8")
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
        start = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-I", "-B", "-c", _limits_code(int(timeout) + 1, memory_mb, file_mb) + GUARD],
            cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True, close_fds=True,
        )
        try:
            out, err = proc.communicate(timeout=timeout)
            status = "passed" if proc.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            out, err = proc.communicate()
            status = "timeout"
        seconds = time.monotonic() - start
        return SandboxResult(status, proc.returncode, out.decode("utf-8", "replace")[-output_limit:],
                             err.decode("utf-8", "replace")[-output_limit:], seconds)
