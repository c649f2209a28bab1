"""Checkpoint, quantize and ``import hf`` inputs are validated where they enter: dtypes with shapes,
finite weights, checked indexes and headers; every failure is one error naming the file."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from mobilemoe.checkpoint import (
    INDEX_FILE,
    SINGLE_FILE,
    CheckpointError,
    load_model,
    load_tensors,
    mmap_tensor,
    save_checkpoint,
    save_tensors,
)
from mobilemoe.cli import main
from mobilemoe.config import preset
from mobilemoe.errors import MobileMoEError
from mobilemoe.export.hf import import_hf
from mobilemoe.model import MobileMoEForCausalLM
from mobilemoe.quant import quantize_checkpoint

Q = "model.layers.0.self_attn.q_proj.weight"
ROUTER = "model.layers.1.feed_forward.router.weight"
NORM = "model.layers.0.input_layernorm.weight"


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckv")
    save_checkpoint(MobileMoEForCausalLM(preset("tiny-moe", num_hidden_layers=2)), root / "float")
    quantize_checkpoint(root / "float", root / "int4")
    return root


def _copy(src, dst, **changes):
    """Copy a checkpoint, replacing tensors (None deletes one)."""
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / SINGLE_FILE))
    for name, value in changes.items():
        name = name.replace("__", ".")
        tensors[name] = value(tensors[name]) if callable(value) else value
    save_file(tensors, str(dst / SINGLE_FILE))
    return dst


def _poke(t, value, index=0):
    t = t.clone()
    t.view(-1)[index] = value
    return t


# ---------------------------------------------------------------------- dtypes
def test_wrong_float_dtypes_listed_with_shapes(float_dir, tmp_path):
    """Probe: an f64 / i32 weight gave a traceback (only shapes were validated)."""
    bad = _copy(float_dir / "float", tmp_path / "bad", **{
        Q: lambda t: t.double(), NORM: lambda t: t.to(torch.int32),
        "model.norm.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError) as info:
        load_model(bad)
    msg = str(info.value)
    assert "wrong dtype (2)" in msg and f"{Q}: expected bfloat16/float16/float32, got float64" in msg
    assert f"{NORM}: expected bfloat16/float16/float32, got int32" in msg
    assert "wrong shape (1): model.norm.weight" in msg and str(bad) in msg


def test_int4_codes_and_scales_dtypes(float_dir, tmp_path):
    """Probe: an i8 qweight or f32 scale gave a traceback."""
    bad = _copy(float_dir / "int4", tmp_path / "bad", **{
        "model.layers.0.self_attn.q_proj.qweight": lambda t: t.to(torch.int8),
        "model.layers.0.self_attn.q_proj.weight_scale": lambda t: t.float()})
    with pytest.raises(CheckpointError) as info:
        load_tensors(bad, lazy=True)  # the native runtime's path
    msg = str(info.value)
    assert "wrong dtype (2)" in msg
    assert "q_proj.qweight: expected uint8, got int8" in msg and "q_proj.weight_scale: expected float16, got float32" in msg


def test_one_f16_tensor_in_an_f32_file_loads_in_f32(float_dir, tmp_path):
    """Probe: an f16 weight among f32 ones gave a traceback (mixed-dtype matmul)."""
    ck = _copy(float_dir / "float", tmp_path / "mixed", **{Q: lambda t: t.half()})
    model = load_model(ck)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_save_refuses_a_wrong_dtype_and_writes_nothing(tmp_path):
    model = MobileMoEForCausalLM(preset("tiny-moe", num_hidden_layers=2))
    state = model.state_dict()
    state[Q] = state[Q].double()
    with pytest.raises(CheckpointError, match=f"wrong dtype.*{Q}"):
        save_tensors(state, model.config, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------- finite values
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_refused_on_load(float_dir, tmp_path, value):
    """Probe: NaN/inf weights loaded and generated garbage with rc 0."""
    bad = _copy(float_dir / "float", tmp_path / "bad", **{Q: lambda t: _poke(t, value), NORM: lambda t: _poke(t, value)})
    with pytest.raises(CheckpointError, match=rf"non-finite values \(NaN/inf\) in 2 tensor\(s\): .*{Q}"):
        load_model(bad)
    cfg, lazy = load_tensors(bad, lazy=True)
    assert torch.isfinite(lazy["model.norm.weight"]).all()  # untouched tensors still read
    with pytest.raises(CheckpointError, match=f"non-finite.*{Q}"):
        lazy[Q]


def test_non_finite_int4_scale_refused(float_dir, tmp_path):
    name = "model.layers.0.feed_forward.experts.down_scale"
    bad = _copy(float_dir / "int4", tmp_path / "bad", **{name: lambda t: _poke(t, float("inf"))})
    with pytest.raises(CheckpointError, match=f"non-finite.*{name}"):
        load_model(bad)


def test_generate_on_a_nan_checkpoint_is_one_error_line(float_dir, tmp_path, capsys):
    bad = _copy(float_dir / "float", tmp_path / "bad", **{Q: lambda t: _poke(t, float("nan"))})
    rc = main(["generate", "--model", str(bad), "--backend", "reference", "--prompt-ids", "1,2",
               "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and "non-finite" in err and Q in err and "Traceback" not in err


@pytest.mark.parametrize("name, value", [(NORM, float("inf")), (ROUTER, float("nan")),
                                         ("model.layers.1.feed_forward.expert_bias", float("nan")),
                                         (Q, float("nan"))])
def test_quantize_refuses_non_finite_input_and_writes_nothing(float_dir, tmp_path, name, value):
    """Probe: quantize of an inf norm / NaN router wrote a poisoned INT4 checkpoint."""
    src = _copy(float_dir / "float", tmp_path / "src", **{name: lambda t: _poke(t, value)})
    with pytest.raises(MobileMoEError, match=f"{SINGLE_FILE}: {name}: has non-finite values"):
        quantize_checkpoint(src, tmp_path / "out")
    assert not (tmp_path / "out" / "config.json").exists() and not (tmp_path / "out" / SINGLE_FILE).exists()


def test_quantize_refuses_wrong_source_dtype(float_dir, tmp_path):
    src = _copy(float_dir / "float", tmp_path / "src", **{ROUTER: lambda t: t.double()})
    with pytest.raises(CheckpointError, match=f"wrong dtype.*{ROUTER}: expected .*got float64"):
        quantize_checkpoint(src, tmp_path / "out")


# ---------------------------------------------------------------------- headers and indexes
def _header_len(path, n):
    data = bytearray(path.read_bytes())
    data[:8] = n.to_bytes(8, "little")
    path.write_bytes(bytes(data))


def test_fuzzed_headers_stay_one_error(float_dir, tmp_path):
    """Held before and must stay: a 2^63 header length and overlapping offsets are clear errors."""
    huge = _copy(float_dir / "int4", tmp_path / "huge")
    _header_len(huge / SINGLE_FILE, 2**63)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_tensors(huge)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        mmap_tensor(huge, "model.embed_tokens.qweight")
    overlap = _copy(float_dir / "float", tmp_path / "overlap")
    raw = (overlap / SINGLE_FILE).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    first, second = [k for k in header if k != "__metadata__"][:2]
    header[second]["data_offsets"] = header[first]["data_offsets"]
    text = json.dumps(header).encode().ljust(n)
    (overlap / SINGLE_FILE).write_bytes(raw[:8] + text + raw[8 + n:])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_tensors(overlap)


@pytest.mark.parametrize("shard", ["../escape.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_index_naming_shards_outside_the_directory_refused(float_dir, tmp_path, shard):
    ck = _copy(float_dir / "float", tmp_path / "ck")
    names = list(load_file(str(ck / SINGLE_FILE)))
    (ck / INDEX_FILE).write_text(json.dumps({"weight_map": {**{k: SINGLE_FILE for k in names}, Q: shard}}))
    with pytest.raises(CheckpointError, match="outside the checkpoint directory") as info:
        load_tensors(ck)
    assert str(ck / INDEX_FILE) in str(info.value) and repr(shard) in str(info.value)


def _hf_dir(float_dir, tmp_path):
    src = tmp_path / "hf"
    shutil.copytree(float_dir / "float", src)
    return src


@pytest.mark.parametrize("case", ["config_not_json", "config_not_object", "config_nan", "header_truncated",
                                  "header_huge", "index_not_json", "index_bad_map", "index_escapes",
                                  "shard_missing", "weight_nan", "weight_f64"])
def test_import_hf_corrupt_inputs_are_one_line_naming_the_file(float_dir, tmp_path, capsys, case):
    """Probe: `import hf` gave a traceback on every corrupt header, config or index."""
    src = _hf_dir(float_dir, tmp_path)
    single, index, config = src / SINGLE_FILE, src / INDEX_FILE, src / "config.json"
    names = list(load_file(str(single)))
    expect = {"config_not_json": config, "config_not_object": config, "config_nan": config,
              "header_truncated": single, "header_huge": single, "index_not_json": index,
              "index_bad_map": index, "index_escapes": index, "shard_missing": src / "gone.safetensors",
              "weight_nan": src, "weight_f64": src}[case]
    if case == "config_not_json":
        config.write_text("{oops")
    elif case == "config_not_object":
        config.write_text("[1, 2]")
    elif case == "config_nan":
        config.write_text(json.dumps({**json.loads(config.read_text()), "rope_theta": float("nan")}))
    elif case == "header_truncated":
        single.write_bytes(single.read_bytes()[:100])
    elif case == "header_huge":
        _header_len(single, 2**63)
    elif case == "index_not_json":
        index.write_text("not json")
    elif case == "index_bad_map":
        index.write_text(json.dumps({"weight_map": ["a", "b"]}))
    elif case == "index_escapes":
        index.write_text(json.dumps({"weight_map": {k: f"../{SINGLE_FILE}" for k in names}}))
    elif case == "shard_missing":
        index.write_text(json.dumps({"weight_map": {k: "gone.safetensors" for k in names}}))
    elif case == "weight_nan":
        save_file({**load_file(str(single)), Q: _poke(load_file(str(single))[Q], float("nan"))}, str(single))
    elif case == "weight_f64":
        save_file({**load_file(str(single)), Q: load_file(str(single))[Q].double()}, str(single))
    with pytest.raises(MobileMoEError) as info:
        import_hf(src, tmp_path / "out")
    assert str(expect) in str(info.value)
    assert not (tmp_path / "out" / "config.json").exists()
    assert main(["import", "hf", str(src), str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mobilemoe import: error: ") and str(expect) in err and "Traceback" not in err


def test_import_hf_still_imports_a_good_directory(float_dir, tmp_path):
    out = import_hf(_hf_dir(float_dir, tmp_path), tmp_path / "out")
    _, a = load_tensors(float_dir / "float")
    _, b = load_tensors(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
