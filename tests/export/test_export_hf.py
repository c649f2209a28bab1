"""Hugging Face export/import: transformers' logits equal mobilemoe's; round trips are lossless."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from mobilemoe.checkpoint import load_model, load_tensors
from mobilemoe.cli import main
from mobilemoe.export.hf import export_hf, import_hf

transformers = pytest.importorskip("transformers")


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits.float()


@pytest.mark.parametrize("name", ["float", "int4", "lead_dense"])
def test_transformers_logits_equal(ckpts, prompt, tmp_path, name):
    out = export_hf(ckpts[name], tmp_path / "hf")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "mobilemoe" and cfg["auto_map"]["AutoModelForCausalLM"]
    assert "quantization" not in cfg  # INT4 is decoded to float32
    for f in ("model.safetensors", "modeling_mobilemoe.py", "configuration_mobilemoe.py", "model.py", "moe.py",
              "config.py", "generation_config.json"):
        assert (out / f).exists()
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    ref = _logits(load_model(ckpts[name]).eval(), prompt)
    got = _logits(hf, prompt)
    assert torch.allclose(got, ref, atol=1e-5, rtol=0), (got - ref).abs().max()


@pytest.mark.parametrize("preset_name", ["tiny-moe-softmax", "tiny-dense"])
def test_transformers_logits_equal_other_families(preset_name, prompt, tmp_path):
    """Softmax router, no shared expert, untied head, no QK-norm; and a dense model."""
    from mobilemoe.checkpoint import save_checkpoint
    from mobilemoe.config import preset
    from mobilemoe.model import MobileMoEForCausalLM

    model = MobileMoEForCausalLM(preset(preset_name)).eval()
    model.reset_parameters(seed=2)
    save_checkpoint(model, tmp_path / "ck")
    hf = transformers.AutoModelForCausalLM.from_pretrained(export_hf(tmp_path / "ck", tmp_path / "hf"),
                                                           trust_remote_code=True).eval()
    assert torch.allclose(_logits(hf, prompt), _logits(model, prompt), atol=1e-5, rtol=0)


def test_import_round_trip_is_lossless(ckpts, prompt, tmp_path):
    export_hf(ckpts["float"], tmp_path / "hf")
    assert main(["import", "hf", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    cfg_a, a = load_tensors(ckpts["float"])
    cfg_b, b = load_tensors(tmp_path / "back")
    # torch_dtype records the tensors' real dtype (fp32 here) after the round trip
    assert cfg_a.replace(torch_dtype="float32").to_dict() == cfg_b.to_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_import_released_int4_layout(ckpts, prompt, tmp_path):
    """A directory in the released facebook/MobileMoE-*-QAT layout (INT4 names, `quantization` block,
    remote code of its own, an extra tied lm_head) imports as an INT4 checkpoint, bit for bit."""
    src = tmp_path / "released"
    src.mkdir()
    cfg = json.loads((ckpts["int4"] / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_mobilemoe.MobileMoEForCausalLM"}
    cfg["transformers_version"] = "4.57.0"
    (src / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(str(ckpts["int4"] / "model.safetensors"))
    save_file(dict(tensors), str(src / "model.safetensors"))
    (src / "tokenizer.json").write_text("{}")
    out = import_hf(src, tmp_path / "ck")
    assert (out / "tokenizer.json").exists()
    cfg2, t2 = load_tensors(out)
    assert cfg2.is_quantized and all(torch.equal(tensors[k], t2[k]) for k in tensors)
    assert torch.equal(_logits(load_model(out), prompt), _logits(load_model(ckpts["int4"]), prompt))


def test_export_copies_tokenizer(ckpts, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(ckpts["plain"], ck)
    from mobilemoe.data.tokenizer import train_bpe

    train_bpe(["hello world, hello export " * 20] * 5, vocab_size=300).save(ck / "tokenizer.json")
    assert main(["export", "hf", str(ck), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "tokenizer.json").read_text() == (ck / "tokenizer.json").read_text()
    assert (tmp_path / "hf" / "tokenizer_config.json").exists()


def test_import_rejects_other_model_types(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(Exception, match="model_type 'llama'"):
        import_hf(tmp_path, tmp_path / "out")
