"""ExecuTorch export: the exported module is the reference model with swapped pieces, and the .pte
(XNNPACK, static KV cache) matches the eager model."""

import pytest
import torch

import mobilemoe.model
import mobilemoe.moe
from mobilemoe.checkpoint import load_model
from mobilemoe.cli import main
from mobilemoe.export.executorch import PREFILL_CHUNK, PteRunner, build_static, export_module, quantize_8da4w
from mobilemoe.moe import select_topk, select_topk_static

MAX_LEN = 16


@pytest.fixture
def small(small_ckpt):
    return small_ckpt


@pytest.fixture
def executorch_runtime():
    pytest.importorskip("executorch.runtime")
    pytest.importorskip("torchao")


def _ref(ckpt, ids):
    with torch.no_grad():
        return load_model(ckpt).eval()(torch.tensor([ids])).logits[0]


def _static(st, ids):
    """Two chunks (prefill, then the rest) through the static cache."""
    with torch.no_grad():
        a = st(torch.tensor([ids[:6]]), torch.tensor([0]))[0]
        b = st(torch.tensor([ids[6:]]), torch.tensor([6]))[0]
    return torch.cat([a, b])


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_static_topk_equals_sorted_topk_with_ties(k):
    """The export's sort-free top-k is the model's rule: best first, ties to the lower index."""
    gen = torch.Generator().manual_seed(k)
    coarse = torch.randint(0, 3, (500, 8), generator=gen).float() / 3  # most rows have ties
    fine = torch.rand(500, 8, generator=gen)
    rows = torch.cat([coarse, fine, torch.zeros(3, 8), torch.full((1, 8), -0.0)])
    got = select_topk_static(rows, k)
    assert torch.equal(got, select_topk(rows, k))
    assert torch.equal(select_topk_static(torch.zeros(1, 8), k)[0], torch.arange(k))  # all tied: 0..k-1


@pytest.mark.parametrize("experts", ["gather", "dense"])
def test_static_module_equals_reference(small, prompt, experts):
    """The export-friendly module (static cache, either dispatch) is the same function, chunked."""
    st = build_static(small, MAX_LEN, experts=experts)
    assert (_static(st, prompt) - _ref(small, prompt)).abs().max() < 1e-5


def _swap_pairs(x, cos, sin, _orig=mobilemoe.model.apply_rope):
    return _orig(x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2), cos, sin)


def _no_bias_route(logits, expert_bias, cfg, select=select_topk, _orig=mobilemoe.moe.route):
    return _orig(logits, torch.zeros_like(expert_bias), cfg, select)


@pytest.mark.parametrize("module,name,mutant", [
    (mobilemoe.model, "apply_rope", _swap_pairs),
    (mobilemoe.model, "rms_norm", lambda x, eps: x),
    (mobilemoe.moe, "route", _no_bias_route),
])
def test_static_module_runs_the_model_code(small, prompt, monkeypatch, module, name, mutant):
    """A mutation of the model's RoPE / norm / routing changes the export module the same way: it
    runs the model's functions, not a copy of them."""
    st = build_static(small, MAX_LEN)
    clean = _static(st, prompt)
    monkeypatch.setattr(module, name, mutant)
    mutated = _static(st, prompt)
    assert (mutated - clean).abs().max() > 1e-3
    assert (mutated - _ref(small, prompt)).abs().max() < 1e-5


def test_pte_fp32_matches_eager(executorch_runtime, small, prompt, tmp_path):
    """fp32 .pte (gathered experts): a prefill chunk, then decode steps, over one shared cache."""
    assert main(["export", "executorch", str(small), str(tmp_path / "m.pte"), "--quantize", "none",
                 "--max-seq-len", str(MAX_LEN)]) == 0
    runner = PteRunner(tmp_path / "m.pte")
    assert runner.chunk == PREFILL_CHUNK < len(prompt)  # both methods run below
    got = runner(prompt, 0)
    ref = _ref(small, prompt)
    assert (got - ref).abs().max() < 1e-4, (got - ref).abs().max()


def test_pte_8da4w_matches_quantized_eager(executorch_runtime, small, prompt, tmp_path):
    """8da4w .pte (dense per-expert linears), decode-only method."""
    st = build_static(small, MAX_LEN, experts="dense")
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
