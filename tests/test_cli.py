import json
import subprocess
import sys

import pytest

from mobilemoe.accounting import account
from mobilemoe.cli import COMMAND_MODULES, build_parser, main
from mobilemoe.config import preset
from mobilemoe.model import MobileMoEForCausalLM


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for name in COMMAND_MODULES:
        assert name in out


@pytest.mark.parametrize("name", COMMAND_MODULES)
def test_every_command_has_help(name, capsys):
    with pytest.raises(SystemExit) as info:
        main([name, "--help"])
    assert info.value.code == 0
    assert "usage" in capsys.readouterr().out


def test_info_json_s(capsys):
    assert main(["info", "--preset", "mobilemoe-s", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["accounting"]["total_params"] == 1263374256
    assert data["config"]["num_local_experts"] == 60


def test_info_table_and_list(capsys, tmp_path):
    assert main(["info", "--preset", "mobilemoe-l"]) == 0
    assert "active params / token" in capsys.readouterr().out
    assert main(["info", "--list"]) == 0
    assert "mobilemoe-s" in capsys.readouterr().out


def test_bad_config_is_one_clear_line(capsys, tmp_path):
    bad = tmp_path / "config.json"
    # tiny-moe's routed width is 64, so 1000 is no multiple of it
    bad.write_text(json.dumps({**preset("tiny-moe").to_dict(), "intermediate_size_mlp": 1000}))
    assert main(["info", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "field 'intermediate_size_mlp': expected a multiple of intermediate_size (64), got 1000" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert main(["info", "--preset", "nope"]) == 2


def test_demo_trains_quantizes_and_generates(capsys, tmp_path):
    args = ["demo", "--json", "--out", str(tmp_path / "demo"), "--max-steps", "2", "--tokens", "4",
            "--val-tokens", "600"]
    assert main(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["stages"] == ["pretrain", "midtrain"]
    assert (tmp_path / "demo" / "int4" / "config.json").exists()
    assert all(data["val_loss"][k] > 0 for k in ("float", "int4", "unigram"))
    assert abs(data["val_loss"]["int4"] - data["val_loss"]["float"]) < 0.5
    assert main(args) == 0  # a rerun resumes: nothing left to train
    assert json.loads(capsys.readouterr().out)["train_tok_s"] is None


def test_console_script_entry_point():
    out = subprocess.run([sys.executable, "-m", "mobilemoe.cli", "info", "--preset", "tiny-moe", "--json"],
                         capture_output=True, text=True, check=True).stdout
    data = json.loads(out)
    assert data["accounting"] == json.loads(json.dumps(account(preset("tiny-moe")).to_dict()))
    # and the accounting's count is the model's own: every parameter of the built module, counted once
    model = MobileMoEForCausalLM(preset("tiny-moe"))
    assert data["accounting"]["total_params"] == sum(p.numel() for p in model.parameters())
