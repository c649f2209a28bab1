"""The format registry (mobilemoe.formats) is the one statement of every storage-format fact: the C++
sources agree with it, the Python modules derive from it, and its byte counts match what the packers
actually produce."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mobilemoe import formats
from mobilemoe.config import INT4_QUANTIZATION_BLOCK, preset

CSRC = Path(formats.__file__).parent / "kernels" / "csrc"
SRC = Path(formats.__file__).parent


def _defines() -> dict[str, int]:
    """The integer #defines of mm_common.h."""
    text = (CSRC / "mm_common.h").read_text()
    return {k: int(v) for k, v in re.findall(r"^#define\s+(MM_\w+)\s+(\d+)\s*$", text, re.M)}


def _value(token: str) -> int:
    """A C++ integer literal or an MM_* constant of mm_common.h."""
    return int(token) if token.isdigit() else _defines()[token]


def _function(path: Path, signature: str) -> str:
    """The text of one C++ function, from its signature to the next blank line."""
    text = path.read_text()
    start = text.index(signature)
    return text[start:text.index("\n\n", start)]


def test_mm_common_block_constants_equal_the_registry():
    d = _defines()
    assert (d["MM_TILE"], d["MM_QK"], d["MM_BLOCK_BYTES"]) == (formats.TILE_ROWS, formats.BLOCK_K, formats.BLOCK_BYTES)


def test_ops_linear_tile_stride_check_matches_the_registry():
    # op_linear.cpp refuses a packed linear weight whose tile stride is below the unpadded tile row.
    text = (CSRC / "op_linear.cpp").read_text()
    expr = re.search(r"packed\.size\(1\) >= (\(K / MM_QK\) \* \(MM_BLOCK_BYTES \+ (\d+) \* MM_TILE\))", text)
    assert expr, "op_linear.cpp: the tile-stride check moved; update this test"
    for k in (32, 64, 96, 1280):
        minimum = eval(re.sub(r"MM_\w+", lambda m: str(_defines()[m.group(0)]), expr.group(1)).replace("K", str(k)))
        stride = formats.linear_tile_stride(k)
        assert minimum <= stride < minimum + formats.TILE_ALIGN and stride % formats.TILE_ALIGN == 0
    assert int(expr.group(2)) == formats.SCALE_BYTES == formats.SCALE_DTYPE.itemsize


def test_model_cpp_embedding_decode_uses_the_checkpoint_group():
    body = _function(CSRC / "model.cpp", "at::Tensor embed(const at::Tensor& ids)")
    groups = re.findall(r"G = H / (\w+)", body) + re.findall(r"g \* (\w+) \+ 2 \* j", body)
    halves = re.findall(r"row\[g \* (\w+) \+ j\]", body) + re.findall(r"j < (\w+); \+\+j", body)
    assert groups and halves, "model.cpp: embed() was rewritten; update this test"
    assert {_value(t) for t in groups} == {formats.GROUP_SIZE}
    assert {_value(t) for t in halves} == {formats.GROUP_SIZE // 2}
    # the nibble order: even index = low nibble, two's complement (>= 8 means negative)
    assert re.search(r"xp\[t \* H \+ g \* \w+ \+ 2 \* j\] = lo \* sc", body)
    assert "(b & 0xF) >= 8 ? (b & 0xF) - 16" in body


def test_model_cpp_hands_the_cache_the_record_parts_in_registry_order():
    # the expert cache reads a record's parts back to back into the slots in the order it is given them
    body = _function(CSRC / "model.cpp", "  void offload_layer(int64_t li, const at::Tensor& record_offsets) {")
    parts = re.search(r"cache->add_layer\(li, record_offsets, \{([^}]*)\}\)", body)
    assert parts, "model.cpp: offload_layer() was rewritten; update this test"
    names = tuple(p.strip().removeprefix("L.") for p in parts.group(1).split(","))
    assert names == formats.RECORD_PARTS


def test_quantization_block_is_the_registry():
    q = INT4_QUANTIZATION_BLOCK
    assert (q["format"], q["group_size"], q["qmin"], q["qmax"]) == (
        formats.INT4_FORMAT, formats.GROUP_SIZE, formats.QMIN, formats.QMAX)
    assert q["scale_dtype"] == str(formats.SCALE_DTYPE).removeprefix("torch.")


def test_registry_keeps_config_and_accounting_torch_free():
    code = "import sys, mobilemoe.accounting; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_tensor_name_rule():
    assert formats.int4_names("model.layers.0.self_attn.q_proj.weight", stacked_experts=False) == (
        "model.layers.0.self_attn.q_proj.qweight", "model.layers.0.self_attn.q_proj.weight_scale")
    assert formats.int4_names("model.layers.1.feed_forward.experts.gate_up_proj", stacked_experts=True) == (
        "model.layers.1.feed_forward.experts.gate_up_qweight", "model.layers.1.feed_forward.experts.gate_up_scale")
    assert formats.int4_shapes((4, 64, 96)) == ((4, 64, 48), (4, 64, 3))
    assert formats.INT4_SUFFIXES == (".qweight", ".weight_scale", "_qweight", "_scale")


def test_checkpoint_name_map_follows_the_rule():
    from mobilemoe.checkpoint import expected_tensors
    from mobilemoe.layout import QUANTIZED_ROLES, tensor_specs

    cfg = preset("tiny-moe", quantization=dict(INT4_QUANTIZATION_BLOCK))
    expected = expected_tensors(cfg)
    for spec in tensor_specs(cfg):
        if spec.role in QUANTIZED_ROLES:
            qn, sn = formats.int4_names(spec.name, spec.role == "experts")
            assert (expected[qn], expected[sn]) == formats.int4_shapes(spec.shape)


def test_expert_group_axis_rule():
    """`in`-grouped experts store [E, out, in] with groups along `in`; linear weights never change."""
    from mobilemoe.checkpoint import expected_tensors
    from mobilemoe.layout import QUANTIZED_ROLES, tensor_specs

    assert formats.int4_group_dim(stacked_experts=True, expert_axis="in") == -2
    assert formats.int4_group_dim(stacked_experts=True) == formats.int4_group_dim(False, "in") == -1
    assert formats.int4_shapes((4, 64, 96), group_dim=-2) == ((4, 96, 32), (4, 96, 2))
    with pytest.raises(ValueError, match="expert group axis"):
        formats.int4_group_dim(True, "rows")
    assert formats.block_expert_axis(formats.int4_quantization_block("in")) == "in"
    assert formats.block_expert_axis(INT4_QUANTIZATION_BLOCK) == "out"
    cfg = preset("tiny-moe", expert_quant_group_axis="in", quantization=formats.int4_quantization_block("in"))
    expected = expected_tensors(cfg)
    for spec in tensor_specs(cfg):
        if spec.role in QUANTIZED_ROLES:
            qn, sn = formats.int4_names(spec.name, spec.role == "experts")
            dim = -2 if spec.role == "experts" else -1
            assert (expected[qn], expected[sn]) == formats.int4_shapes(spec.shape, dim)


def test_one_unpack_function():
    from mobilemoe import quant
    from mobilemoe.kernels import pack

    assert quant.unpack_int4 is formats.unpack_int4 and quant.pack_int4 is formats.pack_int4
    packed = torch.tensor([0x80, 0x7F, 0x1E], dtype=torch.uint8)
    assert formats.unpack_int4(packed).tolist() == [0, -8, -1, 7, -2, 1]
    assert pack._biased_nibbles(packed).tolist() == [8, 0, 7, 15, 6, 9]  # code + 8, the kernels' form


@pytest.mark.parametrize("rows,cols", [(16, 32), (40, 96)])
def test_pack_linear_size_is_the_registry_stride(rows, cols):
    from mobilemoe.kernels.pack import pack_linear
    from mobilemoe.quant import quantize

    packed = pack_linear(*quantize(torch.randn(rows, cols)))
    assert packed.shape == (-(-rows // formats.TILE_ROWS), formats.linear_tile_stride(cols))


def test_pack_experts_size_is_the_registry_size():
    from mobilemoe.kernels.pack import pack_experts
    from mobilemoe.quant import quantize

    E, n_in, n_out = 2, 64, 96
    codes, rows = pack_experts(*quantize(torch.randn(E, n_in, n_out)))
    assert rows.shape == (E, n_out // formats.GROUP_SIZE, formats.expert_scale_row_len(n_in))
    assert (codes.numel() + rows.numel() * rows.element_size()) // E == formats.packed_expert_nbytes(n_in, n_out)


def test_runtime_expert_bytes_is_the_store_record():
    from mobilemoe.accounting import runtime_expert_bytes
    from mobilemoe.runtime.offload import _expected_parts

    cfg = preset("tiny-moe", quantization=dict(INT4_QUANTIZATION_BLOCK))
    parts = _expected_parts(cfg)
    assert tuple(p["name"] for p in parts) == formats.RECORD_PARTS
    assert sum(p["nbytes"] for p in parts) == runtime_expert_bytes(cfg)


def test_q4_0_block_is_ggml_and_our_group():
    gguf = pytest.importorskip("gguf")  # an optional third-party package
    from mobilemoe.export.gguf import Q4_0_BLOCK, Q4_0_BYTES

    assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q4_0] == (Q4_0_BLOCK, Q4_0_BYTES)
    assert Q4_0_BLOCK == formats.GROUP_SIZE  # what makes the INT4 -> Q4_0 copy exact


FORMAT_CONSTANT = re.compile(r"^(GROUP_SIZE|QK|TILE|BLOCK_BYTES|ALIGN|QMIN|QMAX|QMIN, QMAX)\s*=\s*[-\d(]", re.M)


def test_no_module_restates_a_format_constant():
    offenders = [str(p.relative_to(SRC)) for p in SRC.rglob("*.py")
                 if p.name != "formats.py" and FORMAT_CONSTANT.search(p.read_text())]
    assert offenders == []
