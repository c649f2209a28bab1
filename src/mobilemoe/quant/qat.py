"""INT4 quantization-aware training (QAT) for the ``mobilemoe-int4-g32`` format.

:func:`prepare_qat` makes the model's forward use fake-quantized weights, exactly the numbers the
INT4 checkpoint will hold:

* every linear weight (attention, shared expert, dense FFN, untied LM head), logical [out, in],
  grouped along ``in``;
* both stacked routed-expert weights, logical [E, in, out], grouped along ``out`` (or along ``in``
  when the config's ``expert_quant_group_axis`` is ``"in"``:
  :func:`mobilemoe.checkpoint.quantized_group_dim`, the same rule the converter follows);
* the token embedding [V, H] (grouped along ``H``), both as the lookup table and as the tied LM head;
* RMSNorm weights (and attention biases, if any) are rounded to BF16, the dtype the checkpoint
  stores them in, so the QAT forward sees the deployed numbers everywhere. ``expert_bias`` is also
  stored BF16 but is left alone here (the balancer updates it in place outside autograd; it only
  steers expert selection).

All use :func:`mobilemoe.quant.int4.fake_quantize` (symmetric, 32 values per fp16 scale, codes in
[-8, 7]), the very function :func:`mobilemoe.quant.convert.quantize_state_dict` encodes with, so
converting a QAT model's weights gives packed codes whose dequantization equals, bit for bit,
the weights of the QAT forward. The router stays fp32 and is never touched.

Gradients use the straight-through estimator: d fake_quantize(w) / dw is the identity. This is a
custom autograd function (not ``w + (q - w).detach()``, which can be one ulp away from ``q``).

``activations="int8"`` adds per-token dynamic int8 fake quantization of every linear input
("8da4w", as the ExecuTorch/XNNPACK CPU path runs it: asymmetric, one scale and zero point per
token, codes in [-128, 127]), also with a straight-through gradient.

Weights are fake-quantized in their own dtype: with fp32 (master) weights the QAT forward equals the
exact fp32 decode of the INT4 checkpoint (:func:`mobilemoe.checkpoint.load_model`); with
BF16 weights it equals the BF16 decode that :func:`mobilemoe.checkpoint.load_model` runs.

Call :func:`prepare_qat` on the bare model BEFORE wrapping it (DDP/FSDP, torch.compile): FSDP2
itself subclasses module classes, and wrapped models are not recognised.

The implementation swaps module classes in place (``module.__class__``) to subclasses that only
override ``forward``: no parameter is re-created or renamed, so ``state_dict()`` keys,
``save_checkpoint``, parameter identity (optimizer state) and ``isinstance`` checks are unchanged.
:func:`remove_qat` swaps the original classes back and changes no weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mobilemoe.checkpoint import quantized_group_dim
from mobilemoe.errors import MobileMoEError
from mobilemoe.layout import QUANTIZED_ROLES, tensor_specs
from mobilemoe.model import MobileMoEForCausalLM, RMSNorm, rms_norm
from mobilemoe.moe import StackedExperts
from mobilemoe.quant.int4 import GROUP_SIZE, fake_quantize

ACTIVATION_MODES = ("none", "int8")


class QATError(MobileMoEError, ValueError):
    """prepare_qat/remove_qat was given something it cannot handle."""


# ---------------------------------------------------------------------- fake-quant functions
class _FakeQuantSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: torch.Tensor, group_size: int, group_dim: int) -> torch.Tensor:  # type: ignore[override]
        return fake_quantize(w, group_size, group_dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, None, None


def fake_quantize_ste(w: torch.Tensor, group_size: int = GROUP_SIZE, group_dim: int = -1) -> torch.Tensor:
    """INT4 group fake quantization along ``group_dim`` (default the last axis), with a straight-through gradient."""
    return _FakeQuantSTE.apply(w, group_size, group_dim)


def fake_quantize_int8_per_token(x: torch.Tensor) -> torch.Tensor:
    """Asymmetric dynamic int8 fake quantization, one (scale, zero point) per row of the last axis."""
    xf = x.float()
    lo = xf.amin(-1, keepdim=True).clamp(max=0.0)
    hi = xf.amax(-1, keepdim=True).clamp(min=0.0)
    scale = ((hi - lo) / 255.0).clamp(min=torch.finfo(torch.float32).eps)
    zero = torch.clamp(torch.round(-128.0 - lo / scale), -128, 127)
    q = torch.clamp(torch.round(xf / scale) + zero, -128, 127)
    return ((q - zero) * scale).to(x.dtype)


class _ActFakeQuantSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return fake_quantize_int8_per_token(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad


class _RoundBF16STE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return w.to(torch.bfloat16).to(w.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad


def round_bf16_ste(w: torch.Tensor) -> torch.Tensor:
    """``w`` rounded to bfloat16 (the dtype the INT4 checkpoint stores norms in), straight-through."""
    return _RoundBF16STE.apply(w)


def _act(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if getattr(module, "qat_activations", "none") == "int8" and x.numel():
        return _ActFakeQuantSTE.apply(x)
    return x


# ---------------------------------------------------------------------- QAT module classes
class QATLinear(nn.Linear):
    """nn.Linear whose forward uses the INT4 fake-quantized weight (grouped along ``in``)."""

    qat_activations = "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else round_bf16_ste(self.bias)  # biases are stored BF16
        return F.linear(_act(self, x), fake_quantize_ste(self.weight), bias)


class QATRMSNorm(RMSNorm):
    """RMSNorm with its weight rounded to BF16, as the INT4 checkpoint stores it (straight-through)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.eps) * round_bf16_ste(self.weight)


class QATEmbedding(nn.Embedding):
    """nn.Embedding whose lookup table is the INT4 fake-quantized weight (grouped along ``H``)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, fake_quantize_ste(self.weight), self.padding_idx, self.max_norm,
                           self.norm_type, self.scale_grad_by_freq, self.sparse)


class QATStackedExperts(StackedExperts):
    """Routed experts computed with INT4 fake-quantized [E, in, out] weights (grouped along ``out``,
    or ``in``: ``qat_group_dim``, set by :func:`prepare_qat` from the config).

    The parent's forward asks for the weights once per forward (all experts are fake-quantized, so
    the numbers never depend on which experts a batch happens to use); the dispatch is the parent's.
    """

    qat_activations = "none"
    qat_group_dim = -1

    def expert_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.qat_group_dim
        return fake_quantize_ste(self.gate_up_proj, GROUP_SIZE, d), fake_quantize_ste(self.down_proj, GROUP_SIZE, d)

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        return _act(self, x)


class QATMobileMoEForCausalLM(MobileMoEForCausalLM):
    """The LM with a fake-quantized output projection (the tied embedding or the untied lm_head).

    Activations entering the LM head are not fake-quantized (the output matmul reads
    ``output_weight`` directly, not through a module).
    """

    @property
    def output_weight(self) -> torch.Tensor:
        w = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return fake_quantize_ste(w)


_QAT_CLASS = {nn.Linear: QATLinear, nn.Embedding: QATEmbedding, StackedExperts: QATStackedExperts,
              RMSNorm: QATRMSNorm, MobileMoEForCausalLM: QATMobileMoEForCausalLM}
_BASE_CLASS = {qat: base for base, qat in _QAT_CLASS.items()}


# ---------------------------------------------------------------------- prepare / remove
def _targets(model: nn.Module) -> dict[str, tuple[nn.Module, int]]:
    """Modules whose weights the INT4 format quantizes, plus the norms it stores in BF16 (from the
    layout's roles; the router is never a target), each with its weights' INT4 group dim."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise QATError(f"prepare_qat: expected a MobileMoEForCausalLM (with .config), got {type(model).__name__}")
    modules = dict(model.named_modules())
    out: dict[str, tuple[nn.Module, int]] = {}
    for spec in tensor_specs(cfg):
        if spec.role not in QUANTIZED_ROLES and spec.role != "norm":
            continue
        path = spec.name.rsplit(".", 1)[0]  # X.weight -> X;  ...experts.gate_up_proj -> ...experts
        module = modules.get(path)
        if module is None:
            raise QATError(f"prepare_qat: the model has no module {path!r} for tensor {spec.name!r}")
        out[path] = module, quantized_group_dim(cfg, spec)
    return out


def _swap(module: nn.Module, path: str) -> None:
    cls = type(module)
    if cls in _BASE_CLASS:
        return  # already prepared
    if cls not in _QAT_CLASS:
        raise QATError(f"prepare_qat: {path!r} is a {cls.__name__}; expected one of "
                       f"{[c.__name__ for c in _QAT_CLASS]}")
    module.__class__ = _QAT_CLASS[cls]


def prepare_qat(model: nn.Module, activations: str = "none") -> nn.Module:
    """Make ``model`` (a MobileMoEForCausalLM) train with INT4 fake-quantized weights, in place.

    ``activations``: ``"none"`` (weight-only, 4w) or ``"int8"`` (also per-token dynamic int8 on
    linear/expert inputs, 8da4w). Calling it again changes the activation mode. Returns ``model``.
    """
    if activations not in ACTIVATION_MODES:
        raise QATError(f"prepare_qat: activations must be one of {ACTIVATION_MODES}, got {activations!r}")
    targets = _targets(model)
    cfg = model.config
    if cfg.is_quantized:
        raise QATError("prepare_qat: the model's config carries a quantization block; QAT needs a float model")
    for path, (module, group_dim) in targets.items():
        _swap(module, path)
        if isinstance(module, (QATLinear, QATStackedExperts)):
            module.qat_activations = activations
        if isinstance(module, QATStackedExperts):
            module.qat_group_dim = group_dim
    _swap(model, "<model>")
    model.qat_activations = activations
    return model


def remove_qat(model: nn.Module) -> nn.Module:
    """Undo :func:`prepare_qat` in place: original classes back, weights untouched (nothing baked)."""
    for module in model.modules():
        base = _BASE_CLASS.get(type(module))
        if base is not None:
            module.__class__ = base
            module.__dict__.pop("qat_activations", None)
            module.__dict__.pop("qat_group_dim", None)
    return model


def is_qat(model: nn.Module) -> bool:
    """True if any module of ``model`` runs fake-quantized."""
    return any(type(m) in _BASE_CLASS for m in model.modules())


def qat_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The fake-quantized value of every quantized tensor, by state_dict name (no grad)."""
    state = model.state_dict()
    with torch.no_grad():
        return {s.name: fake_quantize(state[s.name], GROUP_SIZE, quantized_group_dim(model.config, s))
                for s in tensor_specs(model.config) if s.role in QUANTIZED_ROLES}
