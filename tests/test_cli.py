import json
import subprocess
import sys

import pytest

from mobilemoe.cli import COMMAND_MODULES, build_parser, main


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
    bad.write_text(json.dumps({"model_type": "mobilemoe", "intermediate_size": 384, "intermediate_size_mlp": 1000}))
    assert main(["info", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "intermediate_size_mlp" in err and "Traceback" not in err
    assert main(["info", "--preset", "nope"]) == 2


def test_demo_runs(capsys):
    assert main(["demo", "--json", "--tokens", "4"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["cached_decode_matches_full_forward"] is True


def test_console_script_entry_point():
    out = subprocess.run([sys.executable, "-m", "mobilemoe.cli", "info", "--preset", "tiny-moe", "--json"],
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out)["accounting"]["total_params"] > 0
