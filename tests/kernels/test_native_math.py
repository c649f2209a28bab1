"""The native forward's restatements of the math against model.py / moe.py on the same inputs.

The native forward re-implements the router scores + top-k (an AVX-512 and a portable variant), RoPE, the
weightless QK-norm and RMSNorm. Each is reached through a test hook of ``mobilemoe._C`` (the very
function the forward calls) and compared with the Python reference under every ISA this CPU runs,
including exact ties (ties go to the lower index) and a selection bias that changes the choice.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import mobilemoe.kernels as K
from mobilemoe.checkpoint import save_checkpoint
from mobilemoe.config import preset
from mobilemoe.model import MobileMoEForCausalLM, RMSNorm, rms_norm
from mobilemoe.moe import route
from mobilemoe.quant import quantize_checkpoint
from mobilemoe.runtime import native

pytestmark = pytest.mark.skipif(not native.is_available(), reason="mobilemoe._C is not built")

ISAS = K.available_isas() if K.is_available() else []
LLAMA3 = preset("mobilemoe-s").rope_scaling  # llama3 frequency scaling, as the released models
# Two layer kinds (RoPE, NoPE) and both router kinds; routed_scaling_factor != 1 so forgetting it shows.
CONFIGS = {
    "sigmoid": dict(router_type="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5),
    "softmax": dict(router_type="softmax", norm_topk_prob=False, routed_scaling_factor=1.5),
}


def _backend(root, router: str) -> tuple[MobileMoEForCausalLM, native.NativeBackend]:
    cfg = preset("tiny-moe", num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=3, vocab_size=256,
                 max_position_embeddings=64, no_rope_layers=[1, 0], rope_theta=500000.0, rope_scaling=LLAMA3,
                 **CONFIGS[router])
    model = MobileMoEForCausalLM(cfg)
    model.reset_parameters(seed=3)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for layer in model.model.layers:
            ff = layer.feed_forward
            ff.router.weight.copy_(torch.randn(ff.router.weight.shape, generator=gen))
            # bf16-exact (the checkpoint stores the bias in bf16), large enough to reorder choices
            ff.expert_bias.copy_(torch.randint(-4, 5, (8,), generator=gen).float() / 16)
    save_checkpoint(model, root / "float")
    quantize_checkpoint(root / "float", root / "int4")
    return model, native.NativeBackend(root / "int4", max_seq_len=64)


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    return _backend(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(params=ISAS)
def isa(request):
    K.set_isa(request.param)
    yield request.param
    K.set_isa(None)


def _ff(model, li):
    return model.model.layers[li].feed_forward


def _expected(model, li, h):
    ff = _ff(model, li)
    logits = F.linear(h, ff.router.weight)
    return route(logits, ff.expert_bias, model.config), logits


def _check_route(backend, model, li, h, isa):
    scores, ids, weights = backend.model.route_test(li, h)
    want, logits = _expected(model, li, h)
    scores_ref = torch.sigmoid(logits) if model.config.router_type == "sigmoid" else logits.softmax(-1)
    torch.testing.assert_close(scores, scores_ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(ids, want.expert_ids), (ids, want.expert_ids)
    torch.testing.assert_close(weights, want.weights, rtol=1e-5, atol=1e-6)
    router = backend.model.kernel_paths()["router"]
    assert router == ("avx512" if isa in ("avx512", "amx") else "portable")  # amx: avx512 + AMX GEMMs


@pytest.mark.parametrize("T", [1, 5])  # one token: the router_rows kernels; more: ATen scores
def test_routing_matches_moe_route(pair, isa, T):
    model, backend = pair
    h = torch.randn(T, model.config.hidden_size, generator=torch.Generator().manual_seed(T))
    for li in range(model.config.num_hidden_layers):
        _check_route(backend, model, li, h, isa)


def test_selection_bias_changes_the_choice(pair, isa):
    """The bias reorders at least one token's choice here (else matching moe.route proves nothing
    about it); the weights stay the unbiased scores of the chosen experts (checked in _check_route)."""
    model, backend = pair
    h = torch.randn(16, model.config.hidden_size, generator=torch.Generator().manual_seed(9))
    ff = _ff(model, 0)
    logits = F.linear(h, ff.router.weight)
    unbiased = route(logits, torch.zeros_like(ff.expert_bias), model.config).expert_ids
    ids = backend.model.route_test(0, h)[1]
    assert not torch.equal(ids, unbiased)
    _check_route(backend, model, 0, h, isa)


# Exact ties: integer-valued hidden states and router rows in multiples of 1/64 make every dot
# product exact in any summation order, so duplicated rows give bit-equal scores in both
# implementations. Token 0's three best experts 2, 5, 7 share one row; per layer a bf16-exact bias:
TIE_BIAS = [
    [0] * 8,  # no bias: the tie goes 2, 5, 7 in index order
    [0, 0, 0, 0, 0, 0, 0, 1 / 16],  # the bias puts 7 first, then 2 before 5
    [0, -1 / 8, 0, 1 / 4, -1 / 4, 0, 1 / 4, 1 / 8],  # with h = 0 all scores tie: the bias ranks 3 = 6 > 7
]
TIE_H = 128


def _tie_inputs(T: int) -> tuple[torch.Tensor, torch.Tensor]:
    h = torch.randint(-1, 2, (T, TIE_H), generator=torch.Generator().manual_seed(5)).float()
    w = torch.randint(-2, 3, (8, TIE_H), generator=torch.Generator().manual_seed(6)).float() / 64
    first = torch.randint(-1, 2, (1, TIE_H), generator=torch.Generator().manual_seed(5)).float()[0]
    w[2] = w[5] = w[7] = first / 8  # token 0 is the same first row for every T
    return h, w


@pytest.fixture(scope="module", params=list(CONFIGS))
def tie_pair(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("ties-" + request.param)
    cfg = preset("tiny-moe", num_hidden_layers=3, num_local_experts=8, num_experts_per_tok=3, vocab_size=256,
                 max_position_embeddings=64, no_rope_layers=[1, 1, 1], **CONFIGS[request.param])
    assert cfg.hidden_size == TIE_H
    model = MobileMoEForCausalLM(cfg)
    model.reset_parameters(seed=3)
    _, w = _tie_inputs(1)
    with torch.no_grad():
        for layer, bias in zip(model.model.layers, TIE_BIAS):
            layer.feed_forward.router.weight.copy_(w)
            layer.feed_forward.expert_bias.copy_(torch.tensor(bias))
    save_checkpoint(model, root / "float")
    quantize_checkpoint(root / "float", root / "int4")
    return model, native.NativeBackend(root / "int4", max_seq_len=64)


@pytest.mark.parametrize("T", [1, 3])
def test_ties_go_to_the_lower_index(tie_pair, isa, T):
    model, backend = tie_pair
    h, _ = _tie_inputs(T)
    for li, want in ((0, [2, 5, 7]), (1, [7, 2, 5])):
        _check_route(backend, model, li, h, isa)
        assert backend.model.route_test(li, h)[1][0].tolist() == want
    zero = torch.zeros(T, TIE_H)
    _check_route(backend, model, 2, zero, isa)
    assert backend.model.route_test(2, zero)[1].tolist() == [[3, 6, 7]] * T


class _Fixed(torch.nn.Module):
    """Stands in for a projection: returns the given output whatever its input."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.value


def _model_rope_qknorm(model, li, qkv, start, monkeypatch) -> torch.Tensor:
    """model.py's own attention (a copy of layer li) with its projections returning qkv: the q, k
    and v it hands to scaled_dot_product_attention, as fused rows [T, (nH + 2 nKV) D]."""
    cfg = model.config
    T, D = qkv.shape[0], cfg.head_dim
    attn = copy.deepcopy(model.model.layers[li].self_attn)
    parts = qkv.split([cfg.num_attention_heads * D, cfg.num_key_value_heads * D, cfg.num_key_value_heads * D], -1)
    attn.q_proj, attn.k_proj, attn.v_proj = (_Fixed(t[None]) for t in parts)
    attn.o_proj = torch.nn.Identity()
    seen = {}

    def capture(q, k, v, **kwargs):
        seen.update(q=q, k=k, v=v)
        return torch.zeros_like(q)

    monkeypatch.setattr(F, "scaled_dot_product_attention", capture)
    cos, sin = model.rope_tables(start, T)
    attn(torch.zeros(1, T, cfg.hidden_size), cos, sin, start, None)
    monkeypatch.undo()
    return torch.cat([seen[n][0].transpose(0, 1).reshape(T, -1) for n in "qkv"], dim=-1)


@pytest.mark.parametrize("start", [0, 7])
def test_rope_and_qk_norm_match_model(pair, isa, start, monkeypatch):
    model, backend = pair
    cfg = model.config
    T = 4
    qkv = torch.randn(T, (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim,
                      generator=torch.Generator().manual_seed(start)) * 3
    for li in range(cfg.num_hidden_layers):
        got = backend.model.rope_qknorm_test(li, qkv, start)
        want = _model_rope_qknorm(model, li, qkv, start, monkeypatch)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got, qkv)  # the hook did something


def test_rope_layers_differ_from_nope_layers(pair):
    model, backend = pair
    cfg = model.config
    qkv = torch.randn(2, (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim)
    assert not torch.allclose(backend.model.rope_qknorm_test(0, qkv, 3), backend.model.rope_qknorm_test(1, qkv, 3))


@pytest.mark.parametrize("H", [128, 100, 7])  # the 16-lane sum and its tail
def test_rms_norm_matches_model(H):
    x = torch.randn(5, H, generator=torch.Generator().manual_seed(H)) * 4
    w = torch.randn(H, generator=torch.Generator().manual_seed(H + 1))
    norm = RMSNorm(H, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(w)
        torch.testing.assert_close(K._lib().rms_norm_rows(x, w, 1e-5), norm(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(K._lib().rms_norm_rows(x, torch.empty(0), 1e-5), rms_norm(x, 1e-5),
                               rtol=1e-5, atol=1e-6)
    tiny = torch.full((1, H), 1e-4)  # eps matters: rms 1e-4 -> sqrt(1e-8 + 1e-5)
    torch.testing.assert_close(K._lib().rms_norm_rows(tiny, torch.empty(0), 1e-5), rms_norm(tiny, 1e-5))
