"""The MoE block against a naive per-token reference written straight from the spec."""

import pytest
import torch

from mobilemoe.config import preset
from mobilemoe.moe import MoEBlock
from reference_impl import naive_moe


def _block(name: str, **kw) -> MoEBlock:
    block = MoEBlock(preset(name, **kw))
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.08)
    return block


@pytest.mark.parametrize("name", ["tiny-moe", "tiny-moe-softmax"])
def test_moe_equals_naive_reference(name):
    block = _block(name)
    x = torch.randn(3, 11, block.cfg.hidden_size)
    with torch.no_grad():
        y, routing = block(x)
    ref, chosen = naive_moe(block, x)
    assert torch.allclose(y, ref, atol=1e-5, rtol=1e-5), (y - ref).abs().max()
    assert routing.expert_ids.tolist() == chosen


def test_ties_in_scores_go_to_the_lower_index():
    block = _block("tiny-moe")
    with torch.no_grad():
        # Experts 3, 5, 7, 9, 11 share one router row: identical scores, a 5-way tie for 4 slots.
        for e in (5, 7, 9, 11):
            block.router.weight[e] = block.router.weight[3]
        block.router.weight[[0, 1, 2, 4, 6, 8, 10, 12, 13, 14, 15]] = 0.0
        block.expert_bias.zero_()
        # Inputs aligned with row 3 give the tied experts positive logits (score > 0.5 = the others').
        x_pos = torch.randn(2, 5, block.cfg.hidden_size).abs() * torch.sign(block.router.weight[3])
        y, routing = block(x_pos)
    ref, chosen = naive_moe(block, x_pos)
    assert routing.expert_ids.tolist() == chosen
    assert all(ids == [3, 5, 7, 9] for ids in chosen)
    assert torch.allclose(y, ref, atol=1e-5)


def test_selection_bias_changes_choice_not_weights():
    block = _block("tiny-moe")
    x = torch.randn(1, 4, block.cfg.hidden_size)
    with torch.no_grad():
        block.expert_bias.zero_()
        block.expert_bias[15] = 100.0  # always selected...
        y, routing = block(x)
    assert (routing.expert_ids[:, 0] == 15).all()
    scores = torch.sigmoid(routing.logits)
    chosen_scores = scores.gather(-1, routing.expert_ids)
    expected = chosen_scores / chosen_scores.sum(-1, keepdim=True) * block.cfg.routed_scaling_factor
    assert torch.allclose(routing.weights, expected)  # ...but weighted by its score, not the bias
    ref, _ = naive_moe(block, x)
    assert torch.allclose(y, ref, atol=1e-5)


def test_router_logits_are_fp32_for_bf16_model():
    block = _block("tiny-moe").to(torch.bfloat16)
    with torch.no_grad():
        _, routing = block(torch.randn(1, 3, block.cfg.hidden_size, dtype=torch.bfloat16))
    assert routing.logits.dtype == torch.float32


def test_unchosen_experts_get_no_gradient():
    block = _block("tiny-moe")
    with torch.no_grad():
        block.expert_bias.zero_()
        block.expert_bias[:4] = 100.0  # only experts 0..3 are ever chosen
    y, _ = block(torch.randn(1, 6, block.cfg.hidden_size))
    y.sum().backward()
    grad = block.experts.gate_up_proj.grad
    assert grad[:4].abs().sum() > 0 and grad[4:].abs().sum() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_gemm_dispatch_equals_per_expert_loop(dtype, monkeypatch):
    """The grouped-GEMM path (one _grouped_mm per projection) gives the per-expert loop's outputs
    and gradients, under autocast too (where _grouped_mm needs its operands cast by hand)."""
    import mobilemoe.moe as moe

    if not moe._HAS_GROUPED_MM:
        pytest.skip("this torch has no _grouped_mm")
    block = _block("tiny-moe")
    x = torch.randn(2, 9, block.cfg.hidden_size)
    results = []
    for grouped in (True, False):
        monkeypatch.setattr(moe, "_HAS_GROUPED_MM", grouped)
        block.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            assert block.experts._grouped_ok(x.reshape(-1, x.shape[-1])) == grouped
            y, _ = block(x)
        (y.float() ** 2).sum().backward()
        results.append((y.detach().float(), block.experts.gate_up_proj.grad.clone(),
                        block.experts.down_proj.grad.clone()))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


@pytest.mark.parametrize("align", [2, 8])
def test_aligned_grouped_gemm_equals_unaligned(align, monkeypatch):
    """Padding every expert group to an aligned start row (what CUDA's grouped GEMM backward needs)
    changes neither outputs nor gradients; run on CPU by forcing the alignment."""
    import mobilemoe.moe as moe

    if not moe._HAS_GROUPED_MM:
        pytest.skip("this torch has no _grouped_mm")
    block = _block("tiny-moe")
    x = torch.randn(2, 9, block.cfg.hidden_size)
    results = []
    for rows in (1, align):
        monkeypatch.setattr(moe, "group_align_rows", lambda x, dtype, rows=rows: rows)
        block.zero_grad()
        y, _ = block(x)
        (y ** 2).sum().backward()
        results.append((y.detach(), block.experts.gate_up_proj.grad.clone(), block.experts.down_proj.grad.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_group_layout_pads_each_group_to_the_alignment():
    from mobilemoe.moe import _group_layout

    counts = torch.tensor([3, 0, 5, 1])
    rows, offs, dest = _group_layout(counts, 9, 4)
    assert rows == 9 + 4 * 3
    assert offs.tolist() == [4, 4, 12, 16]
    assert dest.tolist() == [0, 1, 2, 4, 5, 6, 7, 8, 12]


def test_router_logits_stay_fp32_under_bf16_autocast():
    block = _block("tiny-moe")
    h = torch.randn(5, block.cfg.hidden_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = block.router_logits(h)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, h @ block.router.weight.float().T, atol=1e-5, rtol=1e-5)
