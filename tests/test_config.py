import json

import pytest

from mobilemoe.config import (
    INT4_QUANTIZATION_BLOCK,
    PRESETS,
    ConfigError,
    MobileMoEConfig,
    load_config,
    preset,
)

# The released MobileMoE-S config.json, as described in shared/specs/mobilemoe-checkpoint.md.
RELEASED_S = {
    "model_type": "mobilemoe", "architectures": ["MobileMoEForCausalLM"], "vocab_size": 128256,
    "hidden_size": 768, "intermediate_size": 384, "intermediate_size_mlp": 1536, "num_hidden_layers": 20,
    "num_attention_heads": 12, "num_key_value_heads": 4, "head_dim": 64, "hidden_act": "silu",
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 16.0, "original_max_position_embeddings": 8192,
                     "low_freq_factor": 1.0, "high_freq_factor": 1.0},
    "num_local_experts": 60, "num_experts_per_tok": 4, "interleave_moe_layer_step": 1,
    "no_rope_layers": [1] * 20, "layer_types": ["full_attention"] * 20, "use_qk_norm": True,
    "attn_temperature_tuning": False, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "attention_bias": False, "routed_scaling_factor": 2.5, "norm_topk_prob": True,
    "eos_token_id": [128001, 128008, 128009], "bos_token_id": 128000,
    "quantization": dict(INT4_QUANTIZATION_BLOCK),
    "transformers_version": "4.57.0", "auto_map": {"AutoModelForCausalLM": "modeling_mobilemoe.MobileMoEForCausalLM"},
}


def test_released_config_loads_and_round_trips_unchanged(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(RELEASED_S))
    cfg = MobileMoEConfig.from_json(path)
    assert cfg.is_quantized and cfg.num_local_experts == 60
    assert cfg.extra["auto_map"] == RELEASED_S["auto_map"]  # unknown fields kept
    cfg.to_json(tmp_path / "out.json")
    written = json.loads((tmp_path / "out.json").read_text())
    for key, value in RELEASED_S.items():
        assert written[key] == value, key


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip(name):
    cfg = preset(name)
    again = MobileMoEConfig.from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()


def test_preset_s_matches_released_dimensions():
    cfg = preset("mobilemoe-s")
    for key in ["vocab_size", "hidden_size", "intermediate_size", "intermediate_size_mlp", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "num_local_experts",
                "num_experts_per_tok", "routed_scaling_factor", "rope_theta", "rope_scaling"]:
        assert getattr(cfg, key) == RELEASED_S[key], key


def test_missing_quantization_block_means_bf16():
    assert not preset("mobilemoe-s").is_quantized
    assert "quantization" not in preset("mobilemoe-s").to_dict()


@pytest.mark.parametrize("change, field", [
    ({"quantization": {**INT4_QUANTIZATION_BLOCK, "format": "gptq-int4"}}, "quantization.format"),
    ({"quantization": {**INT4_QUANTIZATION_BLOCK, "group_size": 64}}, "quantization.group_size"),
    ({"quantization": {**INT4_QUANTIZATION_BLOCK, "symmetric": False}}, "quantization.symmetric"),
    ({"quantization": {**INT4_QUANTIZATION_BLOCK, "scale_dtype": "bfloat16"}}, "quantization.scale_dtype"),
    ({"quantization": "int4"}, "quantization"),
    ({"intermediate_size_mlp": 1000}, "intermediate_size_mlp"),
    ({"no_rope_layers": [1] * 19}, "no_rope_layers"),
    ({"no_rope_layers": [2] * 20}, "no_rope_layers"),
    ({"layer_types": ["full_attention"] * 3}, "layer_types"),
    ({"layer_types": ["sliding_attention"] * 20}, "layer_types"),
    ({"num_key_value_heads": 5}, "num_key_value_heads"),
    ({"num_experts_per_tok": 61}, "num_experts_per_tok"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"hidden_size": 0}, "hidden_size"),
    ({"hidden_size": "768"}, "hidden_size"),
    ({"head_dim": 63}, "head_dim"),
    ({"rms_norm_eps": -1}, "rms_norm_eps"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4}}, "rope_scaling.rope_type"),
    ({"rope_scaling": {**RELEASED_S["rope_scaling"], "factor": 0}}, "rope_scaling.factor"),
    ({"rope_scaling": {**RELEASED_S["rope_scaling"], "high_freq_factor": 0.5}}, "rope_scaling.high_freq_factor"),
    ({"router_type": "argmax"}, "router_type"),
    ({"num_shared_experts": 2}, "num_shared_experts"),
    ({"attn_temperature_tuning": True}, "attn_temperature_tuning"),
    ({"model_type": "llama"}, "model_type"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
    ({"num_hidden_layers": None}, "num_hidden_layers"),
])
def test_validation_errors_name_the_field(change, field):
    data = {**RELEASED_S, **change}
    if "quantization_config" in change:
        del data["quantization"]  # the released key is 'quantization'; HF's name alone is a mistake
    with pytest.raises(ConfigError) as info:
        MobileMoEConfig.from_dict(data, source="x/config.json")
    assert f"'{field}'" in str(info.value)
    assert "x/config.json" in str(info.value)


def test_bad_json_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no such config"):
        MobileMoEConfig.from_json(tmp_path / "nope.json")
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        MobileMoEConfig.from_json(tmp_path)


def test_interleave_and_rope_layers():
    cfg = preset("tiny-moe", interleave_moe_layer_step=2, no_rope_layers=[1, 0, 1, 1])
    assert [cfg.is_moe_layer(i) for i in range(4)] == [False, True, False, True]
    assert [cfg.uses_rope(i) for i in range(4)] == [True, False, True, True]
    assert not any(preset("tiny-dense").is_moe_layer(i) for i in range(4))


def test_load_config_needs_exactly_one_source():
    with pytest.raises(ConfigError):
        load_config(None, None)
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("mobilemoe-xxl")
