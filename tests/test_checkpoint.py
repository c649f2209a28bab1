import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mobilemoe.checkpoint import (
    INDEX_FILE,
    SINGLE_FILE,
    CheckpointError,
    expected_tensors,
    load_model,
    load_tensors,
    save_checkpoint,
)
from mobilemoe.config import INT4_QUANTIZATION_BLOCK, preset
from mobilemoe.model import MobileMoEForCausalLM


def _model(name="tiny-moe", **kw):
    model = MobileMoEForCausalLM(preset(name, **kw))
    with torch.no_grad():
        for layer in model.model.layers:
            if layer.is_moe:
                layer.feed_forward.expert_bias.normal_()
    return model


def _bit_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", ["tiny-moe", "tiny-dense", "tiny-moe-softmax"])
def test_save_load_bit_exact(tmp_path, name):
    model = _model(name)
    save_checkpoint(model, tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt")
    assert _bit_equal(model, loaded)
    assert loaded.model.layers[-1].feed_forward.__class__ is model.model.layers[-1].feed_forward.__class__
    ids = torch.randint(0, 512, (1, 5))
    assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_sharded_save_load_bit_exact_and_stale_files_removed(tmp_path):
    model = _model()
    out = tmp_path / "ckpt"
    save_checkpoint(model, out)  # first a single file...
    save_checkpoint(model, out, max_shard_bytes=1_500_000)  # ...then sharded over it
    assert not (out / SINGLE_FILE).exists() and (out / INDEX_FILE).exists()
    index = json.loads((out / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert _bit_equal(model, load_model(out))
    save_checkpoint(model, out)  # back to one file: shards and index go
    assert sorted(p.name for p in out.iterdir()) == ["config.json", SINGLE_FILE]


def test_bf16_save_keeps_router_fp32(tmp_path):
    model = _model()
    save_checkpoint(model, tmp_path, dtype=torch.bfloat16)
    tensors = load_file(str(tmp_path / SINGLE_FILE))
    assert tensors["model.layers.0.feed_forward.router.weight"].dtype == torch.float32
    assert tensors["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_no_temp_files_left_behind(tmp_path):
    save_checkpoint(_model(), tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_truncated_file_gives_clear_error(tmp_path):
    save_checkpoint(_model(), tmp_path)
    path = tmp_path / SINGLE_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted") as info:
        load_tensors(tmp_path)
    assert str(path) in str(info.value)


def test_corrupted_header_gives_clear_error(tmp_path):
    save_checkpoint(_model(), tmp_path)
    path = tmp_path / SINGLE_FILE
    data = bytearray(path.read_bytes())
    data[8:40] = b"\xff" * 32  # garbage inside the JSON header
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_model(tmp_path)


def test_wrong_shape_missing_and_extra_tensors_listed(tmp_path):
    model = _model()
    save_checkpoint(model, tmp_path)
    tensors = load_file(str(tmp_path / SINGLE_FILE))
    tensors["model.layers.1.self_attn.q_proj.weight"] = torch.zeros(3, 3)
    del tensors["model.layers.2.feed_forward.router.weight"]
    tensors["model.layers.9.mystery"] = torch.zeros(2)
    save_file(tensors, str(tmp_path / SINGLE_FILE))
    with pytest.raises(CheckpointError) as info:
        load_model(tmp_path)
    msg = str(info.value)
    assert "missing (1): model.layers.2.feed_forward.router.weight" in msg
    assert "unexpected (1): model.layers.9.mystery" in msg
    assert "model.layers.1.self_attn.q_proj.weight: expected [128, 128], got [3, 3]" in msg


def test_missing_shard_and_missing_files(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load_tensors(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    preset("tiny-moe").to_json(tmp_path / "empty" / "config.json")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_tensors(tmp_path / "empty")
    save_checkpoint(_model(), tmp_path / "s", max_shard_bytes=1_500_000)
    next((tmp_path / "s").glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="shard named in the index is missing"):
        load_tensors(tmp_path / "s")


def test_int4_name_map_follows_release():
    cfg = preset("mobilemoe-s", quantization=dict(INT4_QUANTIZATION_BLOCK))
    names = expected_tensors(cfg)
    assert len(names) == 443  # 3 + 22 per layer x 20, as in the released S file
    assert names["model.embed_tokens.qweight"] == (128256, 384)
    assert names["model.embed_tokens.weight_scale"] == (128256, 24)
    assert names["model.layers.0.feed_forward.experts.gate_up_qweight"] == (60, 768, 384)
    assert names["model.layers.0.feed_forward.experts.gate_up_scale"] == (60, 768, 24)
    assert names["model.layers.0.feed_forward.experts.down_qweight"] == (60, 384, 384)
    assert names["model.layers.0.feed_forward.experts.down_scale"] == (60, 384, 24)
    assert names["model.layers.0.feed_forward.shared_expert.down_proj.qweight"] == (768, 768)
    assert names["model.layers.0.feed_forward.router.weight"] == (60, 768)
    assert names["model.layers.0.feed_forward.expert_bias"] == (60,)
    assert "lm_head.weight" not in names and "lm_head.qweight" not in names
