"""`mobilemoe generate` inputs: every bad value is one line naming the flag (exit 2), never a traceback.

The checks run before the model loads, so most cases need no checkpoint at all."""

import subprocess
import sys

import pytest

from mobilemoe.cli import main
from mobilemoe.commands.generate import parse_size
from mobilemoe.errors import MobileMoEError
from mobilemoe.runtime import SamplingParams


def _err(capsys, *args) -> str:
    assert main(["generate", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mobilemoe generate: error:") and err.count("\n") == 1 and "Traceback" not in err
    return err


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "nan"], "temperature must be a finite number >= 0, got nan"),
    (["--temperature", "inf"], "temperature must be a finite number >= 0, got inf"),
    (["--seed", str(2**64)], "seed must be an integer in [0, 2**64 - 1]"),
    (["--seed", "-1"], "seed must be an integer in [0, 2**64 - 1]"),
    (["--max-seq-len", "-1"], "--max-seq-len: expected a positive number of tokens, got -1"),
    (["--max-seq-len", "0"], "--max-seq-len: expected a positive number of tokens, got 0"),
    (["--max-new-tokens", "-2"], "--max-new-tokens: expected >= 0, got -2"),
    (["--max-memory", "nanGB"], "--max-memory: expected a size like 300MB"),
    (["--max-memory", "infGB"], "--max-memory: expected a size like 300MB"),
    (["--max-memory", "1e999GB"], "--max-memory: expected between 1 byte and 8 EiB"),
    (["--max-memory=-5MB"], "--max-memory: expected a size like 300MB"),
    (["--max-memory", "0"], "--max-memory: expected between 1 byte and 8 EiB"),
    (["--max-memory", "3 parsecs"], "--max-memory: expected a size like 300MB"),
])
def test_bad_flags_are_one_line(tmp_path, capsys, flags, message):
    assert message in _err(capsys, "--model", str(tmp_path), "--prompt-ids", "1", *flags)


def test_sizes():
    assert parse_size("1.5GB") == 1_500_000_000 and parse_size(" 512MiB ") == 512 << 20
    assert parse_size("2e9") == 2_000_000_000 and parse_size("300mb") == 300_000_000 and parse_size("1TiB") == 1 << 40


def test_seed_range_is_torchs():
    params = SamplingParams(temperature=1.0, seed=2**64 - 1)
    from mobilemoe.runtime import Sampler
    import torch

    assert 0 <= Sampler(params)(torch.zeros(8)) < 8
    for bad in (2**64, -1, 1.5, True):
        with pytest.raises(MobileMoEError, match="seed must be an integer"):
            SamplingParams(seed=bad)


def test_invalid_utf8_prompt_file(tmp_path, capsys):
    f = tmp_path / "prompt.txt"
    f.write_bytes("héllo ".encode() + b"\xff\xfe rest")
    err = _err(capsys, "--model", str(tmp_path), "--prompt-file", str(f))
    assert f"--prompt-file {f}: not valid UTF-8 at byte 7 (0xff" in err
    assert f"--prompt-file {tmp_path / 'nope'}: cannot read it" in _err(
        capsys, "--model", str(tmp_path), "--prompt-file", str(tmp_path / "nope"))


def test_invalid_utf8_prompt_argument(tmp_path, capsys):
    """argv bytes that are not UTF-8 reach Python as lone surrogates (surrogateescape)."""
    assert "--prompt: not valid UTF-8 at byte 4" in _err(capsys, "--model", str(tmp_path), "--prompt", "h\u00e9l\udcff")
    proc = subprocess.run([sys.executable.encode(), b"-m", b"mobilemoe.cli", b"generate", b"--model",
                           bytes(tmp_path), b"--prompt", b"ab\xffc"], capture_output=True)
    assert proc.returncode == 2 and b"Traceback" not in proc.stderr
    assert b"--prompt: not valid UTF-8 at byte 2" in proc.stderr


def test_prompt_file_is_the_prompt(int4_ckpt, tmp_path, capsys):
    f = tmp_path / "p.txt"
    f.write_text("hi", encoding="utf-8")
    assert "no tokenizer.json" in _err(capsys, "--model", str(int4_ckpt), "--prompt-file", str(f))
