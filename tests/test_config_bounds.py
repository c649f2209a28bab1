"""Config values are checked where they enter: required shape fields, real integers, finite floats,
strict booleans and upper bounds, each refused with one ConfigError naming the file and the field."""

import json
import time

import pytest

from mobilemoe.cli import main
from mobilemoe.config import ConfigError, MobileMoEConfig, preset

SRC = "x/config.json"


def _tiny(**change):
    data = {**preset("tiny-moe").to_dict(), **change}
    return {k: v for k, v in data.items() if v is not _DROP}


_DROP = object()


@pytest.mark.parametrize("field", ["hidden_size", "num_local_experts", "vocab_size", "num_hidden_layers",
                                   "num_attention_heads", "num_key_value_heads", "head_dim",
                                   "intermediate_size_mlp", "intermediate_size", "num_experts_per_tok"])
def test_missing_shape_field_is_required_not_defaulted(field):
    """Probe: a config.json without hidden_size / num_local_experts silently became MobileMoE-S."""
    with pytest.raises(ConfigError, match=f"missing required field.*'{field}'") as info:
        MobileMoEConfig.from_dict(_tiny(**{field: _DROP}), source=SRC)
    assert SRC in str(info.value)


def test_missing_fields_listed_together_and_dense_needs_no_moe_widths():
    with pytest.raises(ConfigError, match="'hidden_size', 'num_local_experts'"):
        MobileMoEConfig.from_dict(_tiny(hidden_size=_DROP, num_local_experts=_DROP), source=SRC)
    dense = {**preset("tiny-dense").to_dict()}
    del dense["intermediate_size"], dense["num_experts_per_tok"]
    assert not MobileMoEConfig.from_dict(dense, source=SRC).is_moe


@pytest.mark.parametrize("change, field", [
    ({"routed_scaling_factor": float("nan")}, "routed_scaling_factor"),  # probe: generated <|bos|> forever
    ({"routed_scaling_factor": float("inf")}, "routed_scaling_factor"),
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps"),
    ({"rope_theta": float("-inf")}, "rope_theta"),
    ({"initializer_range": float("nan")}, "initializer_range"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": float("nan"), "original_max_position_embeddings": 64,
                       "low_freq_factor": 1.0, "high_freq_factor": 1.0}}, "rope_scaling.factor"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 16.0, "original_max_position_embeddings": 64.5,
                       "low_freq_factor": 1.0, "high_freq_factor": 1.0}}, "rope_scaling.original_max_position_embeddings"),
    ({"use_qk_norm": "false"}, "use_qk_norm"),  # probe: the string "false" read as true
    ({"tie_word_embeddings": 0}, "tie_word_embeddings"),
    ({"norm_topk_prob": "true"}, "norm_topk_prob"),
    ({"attention_bias": None}, "attention_bias"),
    ({"num_hidden_layers": 1e9}, "num_hidden_layers"),  # a float is not an integer
    ({"num_hidden_layers": 4.0}, "num_hidden_layers"),
    ({"num_hidden_layers": True}, "num_hidden_layers"),
    ({"max_position_embeddings": 1e30}, "max_position_embeddings"),  # probe: generate -> traceback
    ({"max_position_embeddings": 2**20 + 1}, "max_position_embeddings"),
    ({"vocab_size": 2**21 + 1}, "vocab_size"),
    ({"hidden_size": 65536 * 2}, "hidden_size"),
    ({"num_local_experts": 4097}, "num_local_experts"),
    ({"intermediate_size": 2**18 * 2}, "intermediate_size"),
    ({"eos_token_id": -1}, "eos_token_id"),
    ({"eos_token_id": [1, "2"]}, "eos_token_id"),
    ({"bos_token_id": 1.5}, "bos_token_id"),
    ({"torch_dtype": "float64"}, "torch_dtype"),
    ({"no_rope_layers": [True, 1, 1, 1]}, "no_rope_layers"),
    ({"quantization": {"format": "mobilemoe-int4-g32", "packed": 1}}, "quantization.packed"),
])
def test_bad_values_name_the_field(change, field):
    with pytest.raises(ConfigError) as info:
        MobileMoEConfig.from_dict(_tiny(**change), source=SRC)
    assert f"field '{field}'" in str(info.value) and SRC in str(info.value)


def test_huge_layer_count_fails_before_anything_is_sized_from_it():
    """Probe: num_hidden_layers 1e9 grew to 7.8 GB (no_rope_layers) before anything failed."""
    start = time.perf_counter()
    for make in (lambda: MobileMoEConfig.from_dict(_tiny(num_hidden_layers=10**9, no_rope_layers=None), SRC),
                 lambda: preset("tiny-moe").replace(num_hidden_layers=10**12),
                 lambda: MobileMoEConfig(num_hidden_layers=10**12)):
        with pytest.raises(ConfigError, match=r"'num_hidden_layers': expected an integer in \[1, 1024\]"):
            make()
    assert time.perf_counter() - start < 1.0


def test_values_inside_the_bounds_still_load():
    cfg = MobileMoEConfig.from_dict(_tiny(num_hidden_layers=1024, no_rope_layers=None,
                                          max_position_embeddings=2**20, rms_norm_eps=1), source=SRC)
    assert cfg.num_hidden_layers == 1024 and isinstance(cfg.rms_norm_eps, float)
    assert preset("tiny-moe").replace(num_hidden_layers=2).no_rope_layers == [1, 1]


def test_unreadable_or_huge_config_file_is_a_config_error(tmp_path):
    huge = tmp_path / "huge.json"
    with open(huge, "wb") as fh:  # sparse: no disk or time spent
        fh.truncate(65 * 1024**2)
    with pytest.raises(ConfigError, match="larger than"):
        MobileMoEConfig.from_json(huge)
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe{}")
    with pytest.raises(ConfigError, match="not valid JSON"):
        MobileMoEConfig.from_json(binary)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(ConfigError, match="not valid JSON"):
        MobileMoEConfig.from_json(deep)


def test_cli_reports_nan_config_in_one_line(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(_tiny(routed_scaling_factor=float("nan"))))  # json writes NaN
    assert main(["info", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "routed_scaling_factor" in err and str(path) in err
