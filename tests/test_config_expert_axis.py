"""The config option expert_quant_group_axis ("out" | "in") and its record in the quantization block."""

import json

import pytest

from mobilemoe.cli import main
from mobilemoe.config import INT4_QUANTIZATION_BLOCK, ConfigError, MobileMoEConfig, preset
from mobilemoe.formats import EXPERT_GROUP_AXIS_TEXT, int4_quantization_block


def _data(**change):
    return {**preset("tiny-moe").to_dict(), **change}


def test_default_is_the_released_out_axis_and_is_not_written():
    cfg = preset("tiny-moe")
    assert cfg.expert_quant_group_axis == "out"
    assert "expert_quant_group_axis" not in cfg.to_dict()  # released configs stay byte-for-byte the same
    assert int4_quantization_block("out") == INT4_QUANTIZATION_BLOCK
    cfg_in = preset("tiny-moe", expert_quant_group_axis="in")
    assert cfg_in.to_dict()["expert_quant_group_axis"] == "in"
    assert MobileMoEConfig.from_dict(cfg_in.to_dict()).expert_quant_group_axis == "in"


@pytest.mark.parametrize("value", ["rows", "IN", "", 1, None, ["in"]])
def test_unknown_axis_is_one_clear_error(tmp_path, value, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(_data(expert_quant_group_axis=value)))
    with pytest.raises(ConfigError) as info:
        MobileMoEConfig.from_json(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg and "'expert_quant_group_axis'" in msg and "['out', 'in']" in msg
    assert main(["info", "--config", str(path)]) == 2  # the CLI: one line, exit 2, no traceback
    err = capsys.readouterr().err
    assert "expert_quant_group_axis" in err and "Traceback" not in err


def test_unknown_recorded_axis_in_a_checkpoint_is_refused(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(_data(quantization={**INT4_QUANTIZATION_BLOCK, "expert_group_axis": "rows"})))
    with pytest.raises(ConfigError, match=r"field 'quantization.expert_group_axis'"):
        MobileMoEConfig.from_json(path)


def test_block_and_field_must_agree():
    with pytest.raises(ConfigError, match="'expert_quant_group_axis': expected 'out'"):
        MobileMoEConfig.from_dict(_data(quantization=dict(INT4_QUANTIZATION_BLOCK), expert_quant_group_axis="in"))
    with pytest.raises(ConfigError, match="'expert_quant_group_axis': expected 'in'"):
        MobileMoEConfig.from_dict(_data(quantization=int4_quantization_block("in"), expert_quant_group_axis="out"))


@pytest.mark.parametrize("recorded, axis", [(None, "out"), (EXPERT_GROUP_AXIS_TEXT["out"], "out"),
                                            ("out", "out"), (EXPERT_GROUP_AXIS_TEXT["in"], "in"), ("in", "in")])
def test_the_block_alone_says_the_axis(recorded, axis):
    """An old checkpoint without the field means `out`; the block's record alone sets the axis."""
    block = dict(INT4_QUANTIZATION_BLOCK)
    block.pop("expert_group_axis")
    if recorded is not None:
        block["expert_group_axis"] = recorded
    cfg = MobileMoEConfig.from_dict(_data(quantization=block))
    assert cfg.expert_quant_group_axis == axis
    assert cfg.replace(quantization=None).expert_quant_group_axis == axis  # survives load_model's float view
