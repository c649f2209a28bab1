"""The HumanEval sandbox is an OS boundary: escapes, false passes, output floods, and the refusal."""

from __future__ import annotations

import os
import resource
import socket
import stat
import subprocess
import sys
import time

import pytest

from mobilemoe.eval import EvalLM, evaluate_humaneval, humaneval_program, run_python
from mobilemoe.eval.runner import check_data
from mobilemoe.eval.sandbox import SandboxUnavailable, require_sandbox

FORK_EXEC_RM = (  # the probe: process creation without an audit event (CPython 3.11/3.12 signature)
    "import _posixsubprocess, os\n"
    "r, w = os.pipe()\n"
    "pid = _posixsubprocess.fork_exec([b'/bin/rm', b'-f', b'{d}/victim.txt'], [b'/bin/rm'], True, (w,), None,"
    " None, -1, -1, -1, -1, -1, -1, r, w, True, False, -1, None, None, None, -1, None, False)\n"
    "os.close(w)\nos.read(r, 100)\nos.waitpid(pid, 0)\n")
ESCAPES = {
    "remove_dir_fd": "import os\nfd = os.open({d!r}, os.O_RDONLY)\nos.remove('victim.txt', dir_fd=fd)\n",
    "opener_dir_fd": ("import os\nfd = os.open({d!r}, os.O_RDONLY)\n"
                      "open('victim.txt', 'w', opener=lambda p, f: os.open(p, f, dir_fd=fd)).write('gone')\n"),
    "fchdir_then_write": ("import os\nos.fchdir(os.open({d!r}, os.O_RDONLY))\n"
                          "open('victim.txt', 'w').write('gone')\nopen('escaped.txt', 'w').write('x')\n"),
    "fork_exec_rm": FORK_EXEC_RM,
    "sqlite_connect": "import sqlite3\nsqlite3.connect({d!r} + '/escaped.txt').execute('create table t(x)')\n",
    # no audit event at all: only the OS layer can stop it
    "sqlite_attach": ("import sqlite3\nc = sqlite3.connect(':memory:')\n"
                      "c.execute('attach database ? as o', ({d!r} + '/escaped.txt',))\n"
                      "c.execute('create table o.t(x)')\n"),
}
HOOK_SEES = set(ESCAPES) - {"sqlite_attach"}


def _outside(path):
    path.mkdir()
    (path / "victim.txt").write_text("keep me")
    return path


def _untouched(d) -> bool:
    return (d / "victim.txt").exists() and (d / "victim.txt").read_text() == "keep me" \
        and not (d / "escaped.txt").exists()


@pytest.mark.sandbox
@pytest.mark.parametrize("audit_hook", [True, False], ids=["with_hook", "os_layer_only"])
@pytest.mark.parametrize("name", list(ESCAPES))
def test_escape_is_contained(tmp_path, name, audit_hook):
    if name == "fork_exec_rm" and sys.version_info[:2] not in ((3, 11), (3, 12)):
        pytest.skip("the probe uses the CPython 3.11/3.12 fork_exec signature")
    # control: unconfined, the same program really does escape (so this test can fail)
    control = _outside(tmp_path / "control")
    subprocess.run([sys.executable, "-I", "-c", ESCAPES[name].format(d=str(control))], cwd=tmp_path,
                   capture_output=True, timeout=30)
    assert not _untouched(control), f"the {name} probe does not escape even unconfined"
    target = _outside(tmp_path / "outside")
    res = run_python(ESCAPES[name].format(d=str(target)), timeout=10, audit_hook=audit_hook)
    assert _untouched(target), (name, res)
    if audit_hook and name in HOOK_SEES:  # the hook refuses first
        assert not res.passed and "PermissionError: sandbox:" in res.stderr, res.stderr
    else:  # the kernel refuses (for fork_exec it is /bin/rm that reports it)
        assert any(m in res.stderr for m in ("Read-only file system", "unable to open database")), res.stderr


@pytest.mark.sandbox
def test_sandbox_view_is_read_only_and_offline(tmp_path):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    try:
        code = ("import os, socket\nassert os.getuid() == 65534\n"
                "for p in ['/', '/tmp', '/dev', {d!r}]:\n"
                "    try:\n        open(os.path.join(p, 'x'), 'w')\n"
                "    except OSError as e:\n        assert e.errno == 30, (p, e)\n"
                "    else:\n        raise AssertionError(p + ' is writable')\n"
                "open('scratch', 'w').write('the work dir is writable')\n"
                "try:\n    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                "except OSError:\n    pass\nelse:\n    raise AssertionError('reached the host network')\n"
                ).format(d=str(tmp_path), port=listener.getsockname()[1])
        res = run_python(code, audit_hook=False)
    finally:
        listener.close()
    assert res.passed, res.stderr
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------- false passes
ADD = {"task_id": "t/0", "prompt": "def add(a, b):\n", "entry_point": "add",
       "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n"}


@pytest.mark.parametrize("exit_early", ["raise SystemExit(0)", "import os\nos._exit(0)",
                                        "import sys\nsys.exit()", "print('passed')\nraise SystemExit"])
@pytest.mark.sandbox
def test_exiting_before_the_tests_is_a_failure(exit_early):
    res = run_python(humaneval_program(ADD, "    return a - b\n" + exit_early + "\n"))
    assert res.returncode == 0  # the exit status alone would have called this a pass
    assert res.status == "failed"


@pytest.mark.sandbox
def test_correct_completion_passes_and_wrong_one_fails():
    good = run_python(humaneval_program(ADD, "    return a + b\nprint('hello')\n"))
    assert good.passed and good.stdout == "hello\n", good
    bad = run_python(humaneval_program(ADD, "    return a - b\n"))
    assert bad.status == "failed" and "AssertionError" in bad.stderr


@pytest.mark.sandbox
def test_closing_stdout_does_not_fake_or_hide_a_result():
    res = run_python(humaneval_program(ADD, "    return a + b\nimport sys\nsys.stdout.close()\n"))
    assert res.passed, res.stderr  # the marker goes to the harness's own descriptor


# ---------------------------------------------------------------------- output flood
@pytest.mark.sandbox
@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_output_flood_is_capped_and_killed(stream):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.monotonic()
    res = run_python(f"import sys\nwhile True:\n    sys.{stream}.write('x' * 65536)\n", timeout=30,
                     output_cap=1 << 20)
    assert time.monotonic() - start < 10  # killed for its output, not by the timeout
    assert res.truncated and res.status == "failed"
    assert "output exceeded 1048576 bytes" in res.stderr
    assert len(res.stdout) <= 4000 and len(res.stderr) <= 4000
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 64 * 1024  # KiB: < 64 MiB growth


@pytest.mark.sandbox
def test_work_dir_is_size_capped():
    res = run_python("open('big', 'wb').write(b'x' * (3 << 20))\n", disk_mb=2, file_mb=16)
    assert res.status == "failed" and "No space left on device" in res.stderr


# ---------------------------------------------------------------------- refusal
def test_missing_bwrap_refuses_with_one_line(tmp_path, monkeypatch, tiny_lm, data_dir):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SandboxUnavailable) as exc:
        require_sandbox()
    msg = str(exc.value)
    assert "\n" not in msg and "`bwrap` is not on PATH" in msg and "apt-get install bubblewrap" in msg
    with pytest.raises(SandboxUnavailable):
        run_python("pass\n")
    with pytest.raises(SandboxUnavailable):
        check_data(["humaneval"], data_dir)  # the CLI's check before it loads a model
    check_data(["arc_easy"], data_dir)  # other tasks do not need it

    def never(*_):
        raise AssertionError("generated before refusing")

    with pytest.raises(SandboxUnavailable):
        evaluate_humaneval(EvalLM(tiny_lm.model, tiny_lm.tokenizer, generate_fn=never),
                           data_dir / "humaneval/HumanEval.jsonl.gz")


def test_broken_bwrap_fails_its_self_test(tmp_path, monkeypatch):
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(SandboxUnavailable, match="failed its self-test .bwrap: No permissions"):
        require_sandbox()
