"""ExecuTorch export: the .pte (XNNPACK, static KV cache, dense masked MoE) matches the eager model."""

import pytest
import torch

from mobilemoe.checkpoint import load_model
from mobilemoe.cli import main
from mobilemoe.export.executorch import PteRunner, build_static, export_module, quantize_8da4w

pytest.importorskip("executorch.runtime")
pytest.importorskip("torchao")

MAX_LEN = 16


@pytest.fixture
def small(small_ckpt):
    return small_ckpt


def _ref(ckpt, ids):
    with torch.no_grad():
        return load_model(ckpt).eval()(torch.tensor([ids])).logits[0]


def test_static_module_equals_reference(small, prompt):
    """The export-friendly forward (static cache, dense MoE) is the same function, chunked or not."""
    st = build_static(small, MAX_LEN)
    with torch.no_grad():
        a = st(torch.tensor([prompt[:6]]), torch.tensor([0]))[0]
        b = st(torch.tensor([prompt[6:]]), torch.tensor([6]))[0]
    assert torch.allclose(torch.cat([a, b]), _ref(small, prompt), atol=1e-5)


def test_pte_fp32_matches_eager(small, prompt, tmp_path):
    assert main(["export", "executorch", str(small), str(tmp_path / "m.pte"), "--quantize", "none",
                 "--max-seq-len", str(MAX_LEN)]) == 0
    runner = PteRunner(tmp_path / "m.pte")
    got = runner(prompt, 0)
    ref = _ref(small, prompt)
    assert (got - ref).abs().max() < 1e-4, (got - ref).abs().max()


def test_pte_8da4w_matches_quantized_eager(small, prompt, tmp_path):
    st = build_static(small, MAX_LEN)
    quantize_8da4w(st)
    with torch.no_grad():
        eager = st(torch.tensor([prompt]), torch.tensor([0]))[0]
    export_module(st, tmp_path / "q.pte")  # resets the caches the eager run filled
    got = PteRunner(tmp_path / "q.pte")(prompt, 0)
    # same quantized function: only kernel rounding differs
    assert (got - eager).abs().max() < 2e-2, (got - eager).abs().max()
    # and close to the float model within the quantization error
    ref = _ref(small, prompt)
    assert (got - ref).abs().max() < 0.3 and (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.8
