"""INT4 quantization-aware training: fake quant placement, STE gradients, exact QAT -> INT4 equality."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quant_helpers import tiny_model, token_ids
from mobilemoe.checkpoint import load_model, save_checkpoint, save_tensors
from mobilemoe.errors import MobileMoEError
from mobilemoe.layout import QUANTIZED_ROLES, tensor_specs
from mobilemoe.model import MobileMoEForCausalLM, RMSNorm
from mobilemoe.moe import StackedExperts
from mobilemoe.quant import (
    fake_quantize,
    fake_quantize_int8_per_token,
    fake_quantize_ste,
    is_qat,
    prepare_qat,
    qat_weights,
    quantize_state_dict,
    remove_qat,
)
from mobilemoe.quant.qat import QATEmbedding, QATLinear, QATMobileMoEForCausalLM, QATStackedExperts


@pytest.fixture
def ids() -> torch.Tensor:
    return token_ids()


def _train_step(model, ids, lr=0.05):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    logits = model(ids).logits
    loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.item()


def test_prepare_keeps_names_and_parameters_and_skips_router():
    model = tiny_model()
    before = {k: v for k, v in model.named_parameters()}
    keys = list(model.state_dict())
    prepare_qat(model)
    assert is_qat(model) and isinstance(model, QATMobileMoEForCausalLM)
    assert list(model.state_dict()) == keys
    assert all(p is before[k] for k, p in model.named_parameters())  # optimizer state stays valid
    layer = model.model.layers[0]
    assert type(layer.self_attn.q_proj) is QATLinear and type(layer.feed_forward.shared_expert.down_proj) is QATLinear
    assert type(layer.feed_forward.experts) is QATStackedExperts
    assert type(model.model.embed_tokens) is QATEmbedding
    assert type(layer.feed_forward.router) is nn.Linear  # router: fp32, never fake-quantized
    assert layer.feed_forward.router.weight.dtype == torch.float32
    prepare_qat(model)  # idempotent
    assert list(model.state_dict()) == keys


def test_ste_passes_gradient_unchanged():
    w = torch.randn(4, 64, requires_grad=True)
    g = torch.randn(4, 64)
    y = fake_quantize_ste(w)
    assert torch.equal(y, fake_quantize(w.detach()))
    y.backward(g)
    assert torch.equal(w.grad, g)
    x = torch.randn(5, 64, requires_grad=True)
    from mobilemoe.quant.qat import _ActFakeQuantSTE

    _ActFakeQuantSTE.apply(x).backward(g[:1].expand(5, 64))
    assert torch.equal(x.grad, g[:1].expand(5, 64))


def test_qat_gradients_equal_float_model_at_fake_quantized_weights(ids):
    """STE: d loss / d w of the QAT model equals d loss / d w_q of a float model holding w_q."""
    qat = prepare_qat(tiny_model(seed=5))
    ref = tiny_model(seed=5)
    with torch.no_grad():
        fq = qat_weights(qat)
        for name, p in ref.named_parameters():
            if name in fq:
                p.copy_(fq[name])
            elif name.endswith("norm.weight"):
                p.copy_(p.to(torch.bfloat16).float())
    losses = []
    for m in (qat, ref):
        logits = m(ids).logits
        loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    grads = dict(ref.named_parameters())
    n_checked = 0
    for name, p in qat.named_parameters():
        if not p.requires_grad:
            continue
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-5, atol=1e-7, msg=name)
        n_checked += 1
    experts = qat.model.layers[0].feed_forward.experts
    assert experts.gate_up_proj.grad.abs().sum() > 0 and experts.down_proj.grad.abs().sum() > 0
    assert n_checked == sum(p.requires_grad for p in qat.parameters())


@pytest.mark.parametrize("expert_bias", [False, True])
def test_qat_model_converts_to_int4_exactly(tmp_path, ids, expert_bias):
    """The key property: INT4 checkpoint of a QAT model decodes to the weights its forward used."""
    model = prepare_qat(tiny_model(seed=7))
    for _ in range(2):
        _train_step(model, ids)  # weights (and norms) move off any grid
    if expert_bias:  # bf16-representable selection biases (the checkpoint stores expert_bias in BF16)
        with torch.no_grad():
            for layer in model.model.layers:
                b = layer.feed_forward.expert_bias
                b.copy_((torch.randn(b.shape, generator=torch.Generator().manual_seed(3)) * 0.05).to(torch.bfloat16))
    with torch.no_grad():
        qat_logits = model(ids).logits
    qcfg, tensors = quantize_state_dict(model.config, model.state_dict())
    save_tensors(tensors, qcfg, tmp_path)
    int4 = load_model(tmp_path)
    # tensor level: every decoded weight equals the fake-quantized weight of the QAT forward, bit for bit
    expected = qat_weights(model)
    loaded = int4.state_dict()
    for spec in tensor_specs(model.config):
        if spec.role in QUANTIZED_ROLES:
            assert torch.equal(loaded[spec.name], expected[spec.name]), spec.name
    with torch.no_grad():
        int4_logits = int4(ids).logits
    diff = (int4_logits - qat_logits).abs().max().item()
    print(f"\nQAT vs INT4 checkpoint logits: max |diff| {diff:.3g} (bit-exact: {torch.equal(int4_logits, qat_logits)})")
    torch.testing.assert_close(int4_logits, qat_logits, rtol=0, atol=1e-6 * qat_logits.abs().max().item())


def test_bf16_qat_matches_load_model_bf16(tmp_path, ids):
    """A BF16 QAT model fake-quantizes to the BF16 rounding of the decode, which is what
    checkpoint.load_model(dtype=bfloat16) runs: same logits."""
    model = tiny_model(seed=8).to(torch.bfloat16)
    model.init_buffers()  # .to() also cast the RoPE table; load_model keeps it fp32
    prepare_qat(model)
    with torch.no_grad():
        qat_logits = model(ids).logits
    qcfg, tensors = quantize_state_dict(model.config, model.state_dict())
    save_tensors(tensors, qcfg, tmp_path)
    ref = load_model(tmp_path, dtype=torch.bfloat16)
    for spec in tensor_specs(model.config):
        if spec.role in QUANTIZED_ROLES:
            assert torch.equal(ref.state_dict()[spec.name], qat_weights(model)[spec.name]), spec.name
    with torch.no_grad():
        torch.testing.assert_close(ref(ids).logits.float(), qat_logits.float(), rtol=0, atol=0)


def test_remove_qat_restores_float_forward(ids):
    model = tiny_model(seed=9)
    plain = tiny_model(seed=9)
    with torch.no_grad():
        ref = plain(ids).logits
        prepare_qat(model)
        q = model(ids).logits
        assert not torch.equal(q, ref)
        remove_qat(model)
        assert not is_qat(model)
        assert type(model) is MobileMoEForCausalLM
        assert type(model.model.layers[0].feed_forward.experts) is StackedExperts
        assert type(model.model.layers[0].input_layernorm) is RMSNorm
        assert torch.equal(model(ids).logits, ref)  # nothing baked in


def test_save_checkpoint_of_qat_model_keeps_float_weights(tmp_path, ids):
    model = prepare_qat(tiny_model(seed=10))
    _train_step(model, ids)
    save_checkpoint(model, tmp_path)
    back = load_model(tmp_path)
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_int8_activation_fake_quant(ids):
    torch.manual_seed(0)
    x = torch.randn(6, 128) * torch.linspace(0.1, 3, 6)[:, None] + 0.3
    fq = fake_quantize_int8_per_token(x)
    lo, hi = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True).clamp(min=0)
    step = (hi - lo) / 255
    assert ((fq - x).abs() <= step * 0.5 + 1e-6).all()  # one scale + zero point per token
    assert len(torch.unique(torch.round((fq - fq.amin(-1, keepdim=True)) / step), dim=None)) <= 256
    base = prepare_qat(tiny_model(seed=11))
    with torch.no_grad():
        w_only = base(ids).logits
    prepare_qat(base, activations="int8")
    assert base.model.layers[0].self_attn.q_proj.qat_activations == "int8"
    logits = base(ids).logits
    rel = ((logits - w_only).norm() / w_only.norm()).item()
    assert 0 < rel < 0.1, rel
    logits.float().pow(2).mean().backward()
    assert base.model.layers[1].feed_forward.experts.down_proj.grad.abs().sum() > 0
    assert base.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_bad_arguments():
    with pytest.raises(MobileMoEError, match="activations must be one of"):
        prepare_qat(tiny_model(), activations="int4")
    with pytest.raises(MobileMoEError, match="expected a MobileMoEForCausalLM"):
        prepare_qat(nn.Linear(32, 32))


def test_qat_loss_decreases(ids):
    model = prepare_qat(tiny_model(seed=12), activations="int8")
    losses = [_train_step(model, ids, lr=0.5) for _ in range(4)]
    assert losses[-1] < losses[0], losses
