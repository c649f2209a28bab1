"""The CLI's net under every command: file-system and file-format errors print one line, not a traceback."""

from __future__ import annotations

import argparse
import errno
import json

import pytest

from mobilemoe import cli


def _run_raising(monkeypatch, capsys, exc: BaseException) -> tuple[int, str]:
    """Run ``mobilemoe info`` with a command function that raises ``exc``."""
    def boom(args):
        raise exc

    def parser():
        p = argparse.ArgumentParser(prog="mobilemoe")
        p.add_subparsers(dest="command").add_parser("info").set_defaults(func=boom)
        return p

    monkeypatch.setattr(cli, "build_parser", parser)
    rc = cli.main(["info"])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("exc, expected", [
    (OSError(errno.ENOSPC, "No space left on device", "/out/final/model.safetensors"),
     "mobilemoe info: error: /out/final/model.safetensors: No space left on device\n"),
    (PermissionError(errno.EACCES, "Permission denied", "/ro/store"), "mobilemoe info: error: /ro/store: Permission denied\n"),
    (json.JSONDecodeError("Expecting value", "{", 1), "mobilemoe info: error: not valid JSON (line 1, column 2): Expecting value\n"),
    (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
     "mobilemoe info: error: not valid UTF-8 text (byte 0): invalid start byte\n"),
])
def test_input_errors_are_one_line(monkeypatch, capsys, exc, expected):
    rc, err = _run_raising(monkeypatch, capsys, exc)
    assert rc == 2
    assert err == expected


def test_safetensors_error_is_one_line(monkeypatch, capsys, tmp_path):
    from safetensors import SafetensorError, safe_open

    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{notjson")
    with pytest.raises(SafetensorError) as info:
        safe_open(str(bad), "pt")
    rc, err = _run_raising(monkeypatch, capsys, info.value)
    assert rc == 2 and err.count("\n") == 1 and "not a valid safetensors file" in err


def test_a_bug_keeps_its_traceback(monkeypatch, capsys):
    with pytest.raises(ZeroDivisionError):
        _run_raising(monkeypatch, capsys, ZeroDivisionError("bug"))
