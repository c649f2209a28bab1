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


def test_quantize_force_removes_the_stale_expert_store(main, ckpt, tmp_path, capsys):
    """The default store OUT/expert-store holds the old checkpoint's experts: it goes with them."""
    from mobilemoe.config import MobileMoEConfig
    from mobilemoe.runtime.offload import STORE_FILE, STORE_INDEX, ensure_store

    out = tmp_path / "int4"
    assert main(["quantize", str(ckpt), str(out), "--json"]) == 0
    assert "removed_stale_expert_store" not in json.loads(capsys.readouterr().out)
    ensure_store(out, MobileMoEConfig.from_json(out / "config.json"), None)
    (out / "expert-store" / "notes.txt").write_text("mine")
    assert main(["quantize", str(ckpt), str(out), "--force", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["removed_stale_expert_store"] == str(out / "expert-store")
    assert not (out / "expert-store" / STORE_FILE).exists() and not (out / "expert-store" / STORE_INDEX).exists()
    assert (out / "expert-store" / "notes.txt").read_text() == "mine"  # only the store's own files go


def test_quantize_output_is_locked(main, ckpt, tmp_path, capsys):
    import os

    from mobilemoe.utils import output_lock

    with output_lock(tmp_path / "int4", "train"):
        assert main(["quantize", str(ckpt), str(tmp_path / "int4")]) == 2
    err = capsys.readouterr().err
    assert f"locked by another writer (pid {os.getpid()} (train))" in err and err.count("\n") == 1
    assert not (tmp_path / "int4" / "config.json").exists()
    assert main(["quantize", str(ckpt), str(tmp_path / "int4")]) == 0  # free again once released


def test_refused_quantize_leaves_nothing_behind(main, ckpt, tmp_path, capsys):
    """A source that is no checkpoint, or OUT == CKPT, is refused before OUT or its lock file exists."""
    assert main(["quantize", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    before = sorted(p.name for p in ckpt.iterdir())
    assert main(["quantize", str(ckpt), str(ckpt)]) == 2
    assert "OUT is the source checkpoint" in capsys.readouterr().err
    assert sorted(p.name for p in ckpt.iterdir()) == before
