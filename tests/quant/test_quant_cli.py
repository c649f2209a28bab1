"""``mobilemoe quantize CKPT OUT [--json]``."""

from __future__ import annotations

import json

import pytest

import mobilemoe.cli as cli
from quant_helpers import tiny_model
from mobilemoe.checkpoint import save_checkpoint


@pytest.fixture
def main(monkeypatch):
    """cli.main with only the quantize command registered (other commands are tested elsewhere)."""
    assert "quantize" in cli.COMMAND_MODULES
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["quantize"])
    return cli.main


@pytest.fixture
def ckpt(tmp_path):
    save_checkpoint(tiny_model(seed=3), tmp_path / "float")
    return tmp_path / "float"


def test_quantize_json_report(main, ckpt, tmp_path, capsys):
    assert main(["quantize", str(ckpt), str(tmp_path / "int4"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "mobilemoe-int4-g32"
    assert report["bytes_before"] == (ckpt / "model.safetensors").stat().st_size
    assert report["bytes_after"] == (tmp_path / "int4" / "model.safetensors").stat().st_size
    assert report["tensors_after"] == 3 + 22 * 2 and report["tensors_before"] == 2 + 13 * 2
    assert report["ratio"] > 4
    assert json.loads((tmp_path / "int4" / "config.json").read_text())["quantization"]["format"] == report["format"]


def test_quantize_text_and_errors(main, ckpt, tmp_path, capsys):
    assert main(["quantize", str(ckpt), str(tmp_path / "int4")]) == 0
    out = capsys.readouterr().out
    assert "bytes:" in out and "tensors:" in out and "smaller" in out
    # an INT4 checkpoint where a float one is expected: one clear line naming the format, exit 2
    assert main(["quantize", str(tmp_path / "int4"), str(tmp_path / "again")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mobilemoe quantize: error:") and "mobilemoe-int4-g32" in err and "Traceback" not in err
    assert main(["quantize", str(ckpt), str(tmp_path / "int4")]) == 2  # refuses to overwrite
    assert "--force" in capsys.readouterr().err
    assert main(["quantize", str(ckpt), str(tmp_path / "int4"), "--force"]) == 0
