"""MobileMoE -> ExecuTorch ``.pte`` (torch.export -> XNNPACK partitioner), optionally 8da4w.

The exported program is the reference :class:`~mobilemoe.model.MobileMoEForCausalLM` itself with the
few pieces that cannot be exported swapped for export-friendly ones (gpt-fast style); norms, RoPE,
QK-norm, attention and SwiGLU run the model's own code:

* KV cache -> :class:`StaticKVCache`: the model's ``KVCache`` interface over registered buffers
  that the program mutates in place (``index_copy_`` at ``input_pos + arange(T)``), so the cache
  lives inside the loaded method between calls. Attention runs over the whole cache with the mask
  ``key_pos <= query_pos``, which also hides the unwritten slots.
* MoE, quantized program (default for 8da4w): each :class:`MoEBlock` -> :class:`QuantizedMoE`, one
  call of ExecuTorch's ``llama::quantized_moe_ffn`` custom op (kernel in the pip runtime): router
  GEMM, sigmoid, top-k on score + expert_bias with ties to the lower index (the model's rule),
  renormalised combine weights x ``routed_scaling_factor``, then only the chosen experts' INT4 weights
  are unpacked and multiplied; the block's shared expert stays the model's ``SwiGLU`` (8da4w). The op
  groups its INT4 weights along ``in``. An INT4 checkpoint with ``expert_quant_group_axis: "in"``
  stores its experts exactly so ([E, out, in] codes + fp16 scales): :func:`checkpoint_expert_codes`
  reads them and the blobs carry those codes and scales (fp16 -> fp32 is exact), so the routed
  experts are **code-exact**. Released checkpoints group along ``out`` and float checkpoints have no
  codes: those experts are re-quantized (:func:`int4_along_in`, the checkpoint's rounding rule; error
  in ``export/README.md``). ``experts="op8"`` stores INT8 instead (0.5% RMS weight error, 1.7x the
  expert bytes).
* MoE, fp32 program: router top-k -> :func:`mobilemoe.moe.select_topk_static` (the same rule
  without a sort, which ExecuTorch has no kernel for) and the model's data-dependent dispatch ->
  :class:`GatheredExperts` (gathers the k chosen experts' weights per token and runs the model's
  expert SwiGLU on them as batched matmuls, so decode reads k experts, not E).
* :class:`DenseExperts` (``experts="dense"``; the 8da4w fallback for configs the op cannot compute,
  :func:`moe_op_unsupported`): every expert as the model's ``SwiGLU`` of ``nn.Linear`` layers, which
  torchao quantizes and XNNPACK lowers, each output scaled by its combine weight (zero where a token
  did not choose it): E/k times the routed FLOPs, and every expert's weights read per token.
* Tied output head -> an ``nn.Linear`` copy of the embedding, so 8da4w quantizes it while the
  embedding lookup stays fp32. Routers stay fp32 and unquantized, as in the checkpoint format.

``forward(tokens [1, T] int64, input_pos [1] int64) -> logits [1, T, V]`` accepts any T eagerly, but
with executorch 1.5.1 lowering specialises a dynamic length to the example's size, so the ``.pte``
holds fixed-length methods over one shared cache (``share_mutable_buffers``): ``forward`` (T = 1,
decode) and, with ``prefill_chunk`` > 1, ``prefill`` (T = prefill_chunk; the op routes the whole
chunk in one call). :class:`PteRunner` feeds a prompt in whole chunks, then the rest one token per call.

8da4w (int8 dynamic per-token activations, int4 symmetric group-32 weights): for an INT4 checkpoint
the linears (attention, shared expert, dense FFN, head) carry the checkpoint's own codes and scales
(:func:`checkpoint_linear_codes`, :func:`quantize_8da4w`), not torchao's re-quantization of their
decoded values. XNNPACK takes positive group scales only, so a group whose checkpoint scale is
negative is stored negated, shifted down one step where it would reach ``+8``, and
:class:`Int4StepCorrection` adds that step back (a 1/32-size fp32 linear on the group sums of the
input), which keeps the weights exactly the checkpoint's; XNNPACK then
rounds group scales to bf16 (<= 2^-9 relative) and rounds activations to int8 per token, the error
that remains (with the routed experts' re-quantization along ``in`` for ``out`` checkpoints).
Float checkpoints are re-quantized by torchao. ``quantize=None`` exports fp32 and matches the eager
model to float rounding. On x86 the pip runtime's ``quantized_moe_ffn`` takes its reference path
(unpack the chosen expert, fp32 GEMM), so the routed experts see fp32 activations, and it is slow:
there the routed program decodes at 0.37-0.58x the dense one on tiny shapes despite reading k of E
experts (numbers in ``export/README.md``).

Tested with executorch 1.5.1 + torchao 0.18.0 (installed ``--no-deps``) beside torch 2.13.0; they
need ``ruamel.yaml`` and ``flatbuffers`` at import.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from typing import NamedTuple

from mobilemoe.config import MobileMoEConfig
from mobilemoe.errors import MobileMoEError
from mobilemoe.export.common import ExportError
from mobilemoe.model import MobileMoEForCausalLM
from mobilemoe.moe import MoEBlock, StackedExperts, SwiGLU, select_topk_static
from mobilemoe.quant.int4 import GROUP_SIZE, QMAX, QMIN, unpack_int4
from mobilemoe.utils import atomic_path


def _require() -> None:
    try:
        import executorch  # noqa: F401
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner  # noqa: F401
    except ImportError as exc:
        raise MobileMoEError(f"ExecuTorch is not importable ({exc}): pip install --no-deps executorch==1.5.1 "
                             "torchao==0.18.0 ruamel.yaml flatbuffers") from None


class StaticKVCache(nn.Module):
    """:class:`mobilemoe.model.KVCache`'s interface with ``start`` a [1] tensor, over buffers
    ``k_cache_{layer}`` / ``v_cache_{layer}`` [1, n_kv, max_len, D] that the program mutates."""

    def __init__(self, cfg: MobileMoEConfig, max_len: int) -> None:
        super().__init__()
        self.max_len = max_len
        shape = (1, cfg.num_key_value_heads, max_len, cfg.head_dim)
        for i in range(cfg.num_hidden_layers):
            self.register_buffer(f"k_cache_{i}", torch.zeros(shape), persistent=False)
            self.register_buffer(f"v_cache_{i}", torch.zeros(shape), persistent=False)

    def update(self, layer: int, start: torch.Tensor, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        positions = start + torch.arange(k.shape[2])
        k_cache, v_cache = getattr(self, f"k_cache_{layer}"), getattr(self, f"v_cache_{layer}")
        k_cache.index_copy_(2, positions, k)
        v_cache.index_copy_(2, positions, v)
        return k_cache, v_cache

    def attention_mask(self, start: torch.Tensor, T: int, S: int, device: torch.device
                       ) -> tuple[torch.Tensor, bool]:
        # every query sees the keys up to its own position; later (maybe unwritten) slots are hidden
        positions = start + torch.arange(T, device=device)
        return torch.arange(S, device=device)[None, :] <= positions[:, None], False

    def reset(self) -> None:
        for buf in self.buffers():
            buf.zero_()


class GatheredExperts(StackedExperts):
    """The model's experts, dispatched by gathering each token's k chosen experts' weights: static
    shapes, and only chosen experts are read. The gathered copies hold N*k experts, so this suits
    decode (N = 1) and short prefill chunks."""

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        n_tokens, k = expert_ids.shape
        gate_up, down = self.expert_weights()
        flat = expert_ids.reshape(-1)
        chosen_gate_up = gate_up.index_select(0, flat).unflatten(0, (n_tokens, k))  # [N, k, H, 2I]
        chosen_down = down.index_select(0, flat).unflatten(0, (n_tokens, k))  # [N, k, I, H]
        y = self._swiglu(x[:, None, None, :], chosen_gate_up, chosen_down).squeeze(-2)  # [N, k, H]
        return (y * weights.unsqueeze(-1).to(x.dtype)).sum(1)


class DenseExperts(nn.Module):
    """The model's experts as per-expert :class:`SwiGLU` linears (quantizable), all run on every token."""

    def __init__(self, experts: StackedExperts) -> None:
        super().__init__()
        gate_up, down = experts.expert_weights()
        E, H, width = gate_up.shape[0], gate_up.shape[1], experts.width
        self.experts = nn.ModuleList(SwiGLU(H, width) for _ in range(E))
        with torch.no_grad():
            for e, mlp in enumerate(self.experts):  # y = x @ W (stacked) -> nn.Linear's [out, in]
                mlp.gate_proj.weight.copy_(gate_up[e, :, :width].t())
                mlp.up_proj.weight.copy_(gate_up[e, :, width:].t())
                mlp.down_proj.weight.copy_(down[e].t())

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        dense = x.new_zeros(x.shape[0], len(self.experts)).scatter(-1, expert_ids, weights.to(x.dtype))
        out = torch.zeros_like(x)
        for e, mlp in enumerate(self.experts):
            out = out + mlp(x) * dense[:, e:e + 1]
        return out


# ---------------------------------------------------------------------- routed INT4 MoE (custom op)
# ExecuTorch's ``llama::quantized_moe_ffn`` (executorch/extension/llm/custom_ops/op_moe.cpp): router
# GEMM, sigmoid (or softmax), top-k on score + bias (ties to the lower index), renormalised weights x
# route_scale, then one INT4 (or INT8) grouped GEMM pair per expert that some token chose. The pip
# runtime (``portable_lib``) registers its kernel; ``libcustom_ops_aot_lib.so`` registers it for
# torch.export and eager calls. Its weights are torchao's "universal" 8da4w blobs (below), one per
# expert, grouped along ``in`` (K) with fp32 scales; on x86 the runtime unpacks a chosen expert's
# blob and runs an fp32 GEMM (activations are not quantized).
OP_NR, OP_KR, OP_SR = 8, 16, 2  # torchao's universal packing parameters (nr, kr, sr)
OP_HEADER_BYTES = 64  # torchao PackedWeightsHeader: magic, format, 14 int params
_OP_HEADER_MAGIC, _OP_FORMAT_UNIVERSAL = 6712, 1


def _load_moe_op() -> None:
    try:
        from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  (loads the AOT library)
    except Exception as exc:  # an ImportError, or the library's own assertion
        raise MobileMoEError(f"ExecuTorch's llama custom ops are not loadable ({type(exc).__name__}: {exc})") from None
    if not hasattr(torch.ops.llama, "quantized_moe_ffn"):
        raise MobileMoEError("this ExecuTorch has no llama::quantized_moe_ffn op")


def moe_op_unsupported(cfg: MobileMoEConfig, expert_bias: torch.Tensor | None = None) -> str | None:
    """Why ``llama::quantized_moe_ffn`` cannot compute this config's routed experts (None: it can)."""
    if not cfg.norm_topk_prob:
        return "norm_topk_prob=false (the op always renormalises the chosen scores)"
    for name in ("hidden_size", "intermediate_size"):
        if getattr(cfg, name) % GROUP_SIZE:
            return f"{name}={getattr(cfg, name)} is not a multiple of {GROUP_SIZE}"
    if cfg.router_type == "softmax" and expert_bias is not None and bool(expert_bias.ne(0).any()):
        return "a softmax router with a non-zero expert_bias (the op selects on raw logits)"
    return None


def int4_along_in(w: torch.Tensor, group_size: int = GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric INT4 codes int8 [..., N, K] and fp32 scales [..., N, K/g] of ``w`` grouped along the
    LAST axis, by the checkpoint's rule (signed scale = group extreme / -8, round, clamp to [-8, 7]).
    A group holding NaN/inf gets a NaN scale (and codes 0): it decodes to NaN, never to a finite lie."""
    groups = w.float().unflatten(-1, (-1, group_size))
    extreme = groups.gather(-1, groups.abs().nan_to_num(float("inf")).argmax(-1, keepdim=True)).squeeze(-1)
    scales = extreme / QMIN
    scales = torch.where(torch.isfinite(groups).all(-1), scales, torch.full_like(scales, float("nan")))
    safe = torch.where(scales == 0, torch.ones_like(scales), scales)
    codes = torch.clamp(torch.round(groups / safe.unsqueeze(-1)), QMIN, QMAX).nan_to_num(0.0).to(torch.int8)
    return codes.flatten(-2), scales


def dequant_along_in(codes: torch.Tensor, scales: torch.Tensor, group_size: int = GROUP_SIZE) -> torch.Tensor:
    """The values :func:`int4_along_in`'s codes and scales stand for (fp32)."""
    return (codes.float().unflatten(-1, (-1, group_size)) * scales.unsqueeze(-1)).flatten(-2)


def pack_universal(codes: torch.Tensor, scales: torch.Tensor, nbit: int = 4, group_size: int = GROUP_SIZE
                   ) -> torch.Tensor:
    """One weight [N, K] (codes int8, scales fp32 [N, K/g]) as torchao's universal 8-bit-activation /
    ``nbit``-bit-weight blob (``torchao::weight_packing::pack_weights<nbit, 8, 16, 2>`` behind a
    :data:`OP_HEADER_BYTES` header; no zero points, no bias), the layout ``quantized_moe_ffn`` reads.

    Per tile of 8 rows and per group: the group's 16-value chunks, each an [8 rows, 16] block reordered
    to [2, 8 rows, 8] and packed 4 bits a value (offset +8; byte i = v[i] | v[i + 16] << 4 over each 32
    values) or 8 bits (int8 as is); then the 8 rows' fp32 scales and int32 code sums."""
    N, K = codes.shape
    G = K // group_size
    rows = -(-N // OP_NR) * OP_NR
    q = torch.zeros(rows, K, dtype=torch.int16)
    q[:N] = codes.to(torch.int16)
    s = torch.zeros(rows, G, dtype=torch.float32)
    s[:N] = scales.float()
    tiles, chunks = rows // OP_NR, group_size // OP_KR
    # [tile, row, group, chunk, sr, kr/sr] -> [tile, group, chunk, sr, row, kr/sr]
    v = q.view(tiles, OP_NR, G, chunks, OP_SR, OP_KR // OP_SR).permute(0, 2, 3, 4, 1, 5)
    if nbit == 4:
        v = (v.reshape(tiles, G, chunks, -1, 32) + 8).to(torch.uint8)
        packed = (v[..., :16] | (v[..., 16:] << 4)).reshape(tiles, G, -1)
    elif nbit == 8:
        packed = v.to(torch.int8).reshape(tiles, G, -1).view(torch.uint8)
    else:
        raise ExportError(f"quantized_moe_ffn weights are 4 or 8 bits, not {nbit}")
    scale_bytes = s.view(tiles, OP_NR, G).permute(0, 2, 1).contiguous().view(torch.uint8).reshape(tiles, G, -1)
    sums = q.view(tiles, OP_NR, G, group_size).sum(-1, dtype=torch.int32).permute(0, 2, 1).contiguous()
    body = torch.cat([packed, scale_bytes, sums.view(torch.uint8).reshape(tiles, G, -1)], -1).reshape(-1)
    header = torch.zeros(OP_HEADER_BYTES // 4, dtype=torch.int32)
    header[:8] = torch.tensor([_OP_HEADER_MAGIC, _OP_FORMAT_UNIVERSAL, nbit, 0, 0, OP_NR, OP_KR, OP_SR])
    return torch.cat([header.view(torch.uint8), body])


def unpack_universal(blob: torch.Tensor, N: int, K: int, nbit: int = 4, group_size: int = GROUP_SIZE
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of :func:`pack_universal`: one blob -> (codes int8 [N, K], fp32 scales [N, K/g]).
    Raises :class:`ExportError` on a header that is not the layout :func:`pack_universal` writes."""
    header = blob[:OP_HEADER_BYTES].contiguous().view(torch.int32)
    want = [_OP_HEADER_MAGIC, _OP_FORMAT_UNIVERSAL, nbit, 0, 0, OP_NR, OP_KR, OP_SR]
    if header[:8].tolist() != want:
        raise ExportError(f"not a universal {nbit}-bit blob: header {header[:8].tolist()}, expected {want}")
    G, tiles, chunks = K // group_size, -(-N // OP_NR), group_size // OP_KR
    code_bytes = OP_NR * group_size * nbit // 8
    body = blob[OP_HEADER_BYTES:].reshape(tiles, G, -1)
    packed, scale_bytes = body[..., :code_bytes], body[..., code_bytes:code_bytes + 4 * OP_NR]
    if nbit == 4:
        p = packed.reshape(tiles, G, chunks, -1, 16)
        v = torch.cat([p & 0xF, p >> 4], -1).to(torch.int16) - 8
    else:
        v = packed.contiguous().view(torch.int8).to(torch.int16)
    # [tile, group, chunk, sr, row, kr/sr] -> [tile, row, group, chunk, sr, kr/sr]
    v = v.reshape(tiles, G, chunks, OP_SR, OP_NR, OP_KR // OP_SR).permute(0, 4, 1, 2, 3, 5)
    codes = v.reshape(tiles * OP_NR, K)[:N].to(torch.int8)
    scales = scale_bytes.contiguous().view(torch.float32).reshape(tiles, G, OP_NR).permute(0, 2, 1)
    return codes, scales.reshape(tiles * OP_NR, G)[:N].contiguous()


class ExpertCodes(NamedTuple):
    """One MoE layer's routed experts as INT4 codes grouped along ``in``, in the op's [out, in]
    orientation: w13 = gate rows then up rows [E, 2I, H] (scales fp32 [E, 2I, H/32]), w2 [E, H, I]
    (scales [E, H, I/32])."""
    w13_codes: torch.Tensor
    w13_scales: torch.Tensor
    w2_codes: torch.Tensor
    w2_scales: torch.Tensor

    def decoded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The model-layout experts (gate_up [E, H, 2I], down [E, I, H]) these codes stand for (fp32)."""
        return (dequant_along_in(self.w13_codes, self.w13_scales).transpose(1, 2).contiguous(),
                dequant_along_in(self.w2_codes, self.w2_scales).transpose(1, 2).contiguous())


def checkpoint_expert_codes(ckpt: str | os.PathLike) -> dict[int, ExpertCodes]:
    """Layer index -> the checkpoint's own routed-expert codes and scales, for an INT4 checkpoint whose
    experts are grouped along ``in`` (``expert_quant_group_axis: "in"``: stored [E, out, in], the op's
    orientation and grouping, so nothing is re-quantized). Empty for float checkpoints and for ``out``
    (released) ones, whose groups the op cannot read."""
    from mobilemoe.checkpoint import load_tensors, quantized_group_dim, quantized_names
    from mobilemoe.layout import tensor_specs

    cfg, tensors = load_tensors(ckpt, lazy=True)
    if not cfg.is_quantized or cfg.expert_quant_group_axis != "in":
        return {}
    parts: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for spec in tensor_specs(cfg):
        if spec.role != "experts":
            continue
        if quantized_group_dim(cfg, spec) != -2:
            raise ExportError(f"{spec.name}: expected routed experts grouped along 'in'")
        qname, sname = quantized_names(spec)
        which = "w13" if spec.name.endswith("gate_up_proj") else "w2"
        parts.setdefault(spec.layer, {})[which] = (unpack_int4(tensors[qname]), tensors[sname].float())
    return {layer: ExpertCodes(*p["w13"], *p["w2"]) for layer, p in parts.items()}


def op_expert_weights(experts: StackedExperts) -> tuple[torch.Tensor, torch.Tensor]:
    """(w13 [E, 2I, H], w2 [E, H, I]) in the op's [out, in] orientation: w13 = gate rows then up rows
    (the op computes silu(first I) * second I, as the model's gate/up split)."""
    gate_up, down = experts.expert_weights()
    return gate_up.detach().transpose(1, 2).float(), down.detach().transpose(1, 2).float()


def requantized_experts(experts: StackedExperts) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's (gate_up [E, H, 2I], down [E, I, H]) as the op's INT4 blobs decode them: the values
    a reference model needs to compute the same function as :class:`QuantizedMoE`."""
    w13, w2 = op_expert_weights(experts)
    return (dequant_along_in(*int4_along_in(w13)).transpose(1, 2).contiguous(),
            dequant_along_in(*int4_along_in(w2)).transpose(1, 2).contiguous())


class QuantizedMoE(nn.Module):
    """A :class:`MoEBlock` as one ``llama::quantized_moe_ffn`` call (router, top-k, only the chosen
    experts' INT4 weights) plus the block's own shared expert. ``forward(x) -> (out, None)``: the
    routing stays inside the op.

    ``codes`` (INT4 only; :func:`checkpoint_expert_codes`): the checkpoint's own codes and scales
    grouped along ``in``; the blobs then hold them as they are (``code_exact``). They must decode to
    the block's expert weights bit for bit (the model the rest of the program is built from), else
    :class:`ExportError`. Without ``codes`` the block's weights are re-quantized along ``in``."""

    def __init__(self, block: MoEBlock, nbit: int = 4, codes: ExpertCodes | None = None) -> None:
        super().__init__()
        _load_moe_op()
        cfg = block.cfg
        reason = moe_op_unsupported(cfg, block.expert_bias)
        if reason:
            raise ExportError(f"cannot route the INT4 experts with quantized_moe_ffn: {reason}; "
                              "export with experts='dense'")
        self.num_experts, self.k = cfg.num_local_experts, cfg.num_experts_per_tok
        self.hidden, self.width, self.nbit = cfg.hidden_size, cfg.intermediate_size, nbit
        self.score_func = cfg.router_type
        # The softmax path has no route_scale: fold the model's factor into the down projection.
        self.route_scale = float(cfg.routed_scaling_factor) if cfg.router_type == "sigmoid" else 1.0
        fold = float(cfg.routed_scaling_factor) if cfg.router_type != "sigmoid" else 1.0
        self.code_exact = codes is not None
        if codes is not None:
            if nbit != 4:
                raise ExportError(f"the checkpoint's expert codes are INT4; they cannot fill {nbit}-bit blobs")
            model_weights = [w.detach().float() for w in block.experts.expert_weights()]
            if not all(torch.equal(got, want) for got, want in zip(codes.decoded(), model_weights)):
                raise ExportError("the model's routed experts are not the values of the checkpoint's INT4 expert codes "
                                  "(the program would mix two models): build it from load_model(ckpt) unchanged")
            w13 = list(zip(codes.w13_codes, codes.w13_scales))
            w2 = list(zip(codes.w2_codes, codes.w2_scales * fold))  # codes kept; the factor goes into the scales
        else:
            quant = int4_along_in if nbit == 4 else _int8_along_in
            w13_f, w2_f = op_expert_weights(block.experts)
            w13, w2 = [quant(w) for w in w13_f], [quant(w) for w in w2_f * fold]
        self.register_buffer("gate_weight", block.router.weight.detach().float().clone())
        self.register_buffer("expert_bias", block.expert_bias.detach().float().clone()
                             if cfg.router_type == "sigmoid" else torch.empty(0))
        self.register_buffer("packed_w13", torch.stack([pack_universal(c, sc, nbit) for c, sc in w13]))
        self.register_buffer("packed_w2", torch.stack([pack_universal(c, sc, nbit) for c, sc in w2]))
        self.shared_expert = block.shared_expert

    def decoded_experts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """What the blobs hold, decoded (``code * scale``, fp32) into the model's layout: (gate_up
        [E, H, 2I], down [E, I, H]); with a softmax router ``down`` includes the folded route scale."""
        H, width = self.hidden, self.width
        w13 = [dequant_along_in(*unpack_universal(b, 2 * width, H, self.nbit)) for b in self.packed_w13]
        w2 = [dequant_along_in(*unpack_universal(b, H, width, self.nbit)) for b in self.packed_w2]
        return torch.stack(w13).transpose(1, 2).contiguous(), torch.stack(w2).transpose(1, 2).contiguous()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        shape = x.shape
        h = x.reshape(-1, shape[-1]).float()
        out = torch.ops.llama.quantized_moe_ffn(
            h, self.gate_weight, self.expert_bias, self.packed_w13, self.packed_w2, self.k, self.num_experts,
            self.width, self.hidden, GROUP_SIZE, self.nbit, self.score_func, self.route_scale)
        if self.shared_expert is not None:
            out = out + self.shared_expert(h)
        return out.reshape(shape).to(x.dtype), None


def _int8_along_in(w: torch.Tensor, group_size: int = GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric INT8 group-``group_size`` codes and fp32 scales along the last axis (amax / 127)."""
    groups = w.float().unflatten(-1, (-1, group_size))
    scales = groups.abs().amax(-1) / 127
    safe = torch.where(scales == 0, torch.ones_like(scales), scales)
    codes = torch.clamp(torch.round(groups / safe.unsqueeze(-1)), -127, 127).nan_to_num(0.0).to(torch.int8)
    return codes.flatten(-2), scales


def _gathered(experts: StackedExperts) -> GatheredExperts:
    E, H, two_width = experts.gate_up_proj.shape
    with torch.device("meta"):
        new = GatheredExperts(E, H, two_width // 2)
    new.load_state_dict(experts.state_dict(), assign=True)
    return new


EXPERT_DISPATCH = ("gather", "dense", "op", "op8")


def swap_for_export(model: MobileMoEForCausalLM, experts: str = "gather",
                    expert_codes: dict[int, ExpertCodes] | None = None) -> MobileMoEForCausalLM:
    """In place: export-friendly top-k and expert dispatch, untied head. ``experts``: ``"gather"``
    (fp32, the k chosen experts gathered per token), ``"dense"`` (every expert as quantizable
    linears), ``"op"`` / ``"op8"`` (each MoE block as :class:`QuantizedMoE`: the chosen experts only,
    INT4 / INT8 group-32 weights along ``in``). ``expert_codes`` (layer -> codes, from
    :func:`checkpoint_expert_codes`; used by ``"op"`` only): those layers' INT4 blobs are the
    checkpoint's codes, code-exact; other layers are re-quantized."""
    if experts not in EXPERT_DISPATCH:
        raise ExportError(f"unknown expert dispatch {experts!r}: choose one of {', '.join(EXPERT_DISPATCH)}")
    codes = expert_codes if experts == "op" and expert_codes else {}
    for i, layer in enumerate(model.model.layers):
        block = layer.feed_forward
        if not isinstance(block, MoEBlock):
            continue
        if experts in ("op", "op8"):
            layer.feed_forward = QuantizedMoE(block, nbit=4 if experts == "op" else 8, codes=codes.get(i))
        else:
            block.select = select_topk_static
            block.experts = _gathered(block.experts) if experts == "gather" else DenseExperts(block.experts)
    if model.lm_head is None:  # its own nn.Linear, so that 8da4w quantizes the head (not the lookup)
        weight = model.output_weight
        model.lm_head = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            model.lm_head.weight.copy_(weight)
    return model.requires_grad_(False)


class StaticMobileMoE(nn.Module):
    """Export entry point: ``forward(tokens [1, T], input_pos [1]) -> logits [1, T, V]`` over a
    :func:`swap_for_export`-ed model and a :class:`StaticKVCache`."""

    def __init__(self, model: MobileMoEForCausalLM, max_seq_len: int) -> None:
        super().__init__()
        self.model = model
        self.cache = StaticKVCache(model.config, max_seq_len)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        # MobileMoEForCausalLM.forward's body minus its Python-side checks and output dataclass
        cos, sin = self.model.rope_tables(input_pos, tokens.shape[1])
        x = self.model.model.embed_tokens(tokens)
        for layer in self.model.model.layers:
            x, _ = layer(x, cos, sin, input_pos, self.cache)
        return self.model.lm_head(self.model.model.norm(x))


def check_executorch(cfg: MobileMoEConfig) -> None:
    """Everything the reference model runs is representable; only the batch is fixed at 1."""
    if cfg.num_local_experts > 512:
        raise ExportError(f"cannot export to ExecuTorch: num_local_experts={cfg.num_local_experts} unrolled experts "
                          "would make an impractically large graph")


def _load(ckpt: str | os.PathLike) -> MobileMoEForCausalLM:
    from mobilemoe.checkpoint import load_model

    model = load_model(ckpt, dtype=torch.float32).eval()
    check_executorch(model.config)
    return model


def static_module(model: MobileMoEForCausalLM, max_seq_len: int = 256, experts: str = "gather",
                  expert_codes: dict[int, ExpertCodes] | None = None) -> StaticMobileMoE:
    """Wrap an fp32 model (swapped in place, see :func:`swap_for_export`) for export."""
    max_seq_len = min(max_seq_len, model.config.max_position_embeddings)
    return StaticMobileMoE(swap_for_export(model, experts, expert_codes), max_seq_len).eval()


def build_static(ckpt: str | os.PathLike, max_seq_len: int = 256, experts: str = "gather") -> StaticMobileMoE:
    """Load ``ckpt`` in fp32 and wrap it for export (``experts``: see :func:`swap_for_export`); with
    ``"op"``, an INT4 checkpoint grouped along ``in`` gives code-exact expert blobs
    (:func:`checkpoint_expert_codes`)."""
    codes = checkpoint_expert_codes(ckpt) if experts == "op" else None
    return static_module(_load(ckpt), max_seq_len, experts, codes)


def checkpoint_linear_codes(ckpt: str | os.PathLike) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Weight name -> the checkpoint's own INT4 codes (int8 [out, in]) and scales (fp32 [out, in/32],
    signed: group extreme / -8) of every linear the 8da4w program quantizes: attention, shared expert,
    dense FFN and the output head (``"lm_head.weight"``; the embedding's codes when tied). Names are
    the model's (``model.layers.0.self_attn.q_proj.weight``). Empty for float checkpoints; tensors
    grouped other than along ``in`` by 32 are left out (re-quantized by torchao)."""
    from mobilemoe.checkpoint import load_tensors, quantized_group_dim, quantized_names
    from mobilemoe.layout import tensor_specs

    cfg, tensors = load_tensors(ckpt, lazy=True)
    if not cfg.is_quantized:
        return {}
    out = {}
    for spec in tensor_specs(cfg):
        if spec.role not in ("linear", "lm_head") and not (spec.role == "embedding" and cfg.tie_word_embeddings):
            continue
        if quantized_group_dim(cfg, spec) != -1:
            continue
        qname, sname = quantized_names(spec)
        codes, scales = unpack_int4(tensors[qname]), tensors[sname].float()
        if codes.shape != spec.shape or codes.shape[-1] != scales.shape[-1] * GROUP_SIZE:
            continue
        out["lm_head.weight" if spec.role == "embedding" else spec.name] = (codes, scales)
    return out


def xnnpack_int4(codes: torch.Tensor, scales: torch.Tensor, group_size: int = GROUP_SIZE, fit: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Checkpoint INT4 (codes [-8, 7], signed scales: group extreme / -8) as int4 weights XNNPACK's
    blockwise kernels take: it refuses a scale that is not positive (``xnn_status_invalid_parameter``
    at method load) and ExecuTorch drops per-group zero points. A group with a positive scale stays as
    it is (exact). A negative one is negated: codes ``-c`` lie in [-7, 8]; where that reaches ``+8``
    (a ``c = -8``, the group's extreme) the whole group is stored as ``-c - 1`` (in [-8, 7]), one step
    (``|scale|``) short on every entry, which :class:`Int4StepCorrection` adds back per group; with
    ``fit`` such a group is instead the least-squares int4 fit of its values (scales amax / d, d in
    [6, 8], no correction needed, not exact). An all-zero group (scale 0) gets scale 1 (its codes are 0)."""
    neg = scales < 0
    grouped = codes.to(torch.int16).unflatten(-1, (-1, group_size))
    # fit starts from the clamped form (one entry a step short), the one a fit must beat
    negated = (-grouped).clamp(max=QMAX) if fit else \
        -grouped - _shifted_groups(codes, scales, group_size).to(torch.int16).unsqueeze(-1)
    best_c = torch.where(neg.unsqueeze(-1), negated, grouped)
    best_s = scales.abs()
    if fit:
        values = grouped.float() * scales.unsqueeze(-1)
        amax = values.abs().amax(-1)  # = 8 |scale|
        best_err = ((best_c.float() * best_s.unsqueeze(-1) - values) ** 2).sum(-1)
        for d in torch.linspace(6.0, 8.0, 33)[:-1].tolist():
            sc = torch.where(amax > 0, amax / d, torch.ones_like(amax))
            c = torch.clamp(torch.round(values / sc.unsqueeze(-1)), QMIN, QMAX)
            err = ((c * sc.unsqueeze(-1) - values) ** 2).sum(-1)
            better = neg & (err < best_err)
            best_c = torch.where(better.unsqueeze(-1), c.to(torch.int16), best_c)
            best_s, best_err = torch.where(better, sc, best_s), torch.where(better, err, best_err)
    return best_c.flatten(-2).to(torch.int8), torch.where(best_s == 0, torch.ones_like(best_s), best_s)


class Int4StepCorrection(nn.Module):
    """An 8da4w linear plus the step its XNNPACK int4 weights miss (:func:`xnnpack_int4`): every group
    whose codes were shifted down by one is given back ``|scale| * sum(x over the group)``, one fp32
    ``[out, in / 32]`` linear on the group sums of ``x`` (``shift``: the checkpoint's fp16 scale where
    the group is shifted, else 0), so that the program's weights are the checkpoint's values exactly.
    A dense matmul 1/32 the size of the linear, which XNNPACK runs: a per-entry gather of the
    missing steps cost ~3.7x the decode time of MobileMoE-S (2 layers) in ExecuTorch's portable ops."""

    def __init__(self, linear: nn.Module, shift: torch.Tensor) -> None:
        super().__init__()
        self.linear = linear
        self.register_buffer("shift", shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sums = x.unflatten(-1, (self.shift.shape[-1], -1)).sum(-1)
        return self.linear(x) + F.linear(sums, self.shift)

    @staticmethod
    def residual(codes: torch.Tensor, scales: torch.Tensor, group_size: int = GROUP_SIZE) -> torch.Tensor | None:
        """``shift`` [out, in / group_size] fp32 of :func:`xnnpack_int4`'s exact form (None: no group is shifted)."""
        shifted = _shifted_groups(codes, scales, group_size)
        if not shifted.any():
            return None
        return torch.where(shifted, -scales, torch.zeros_like(scales)).float()


def _shifted_groups(codes: torch.Tensor, scales: torch.Tensor, group_size: int = GROUP_SIZE) -> torch.Tensor:
    """[out, groups] bool: negative-scale groups holding a -8 code (negated, it would be +8)."""
    return (scales < 0) & (codes.unflatten(-1, (-1, group_size)) == QMIN).any(-1)


def quantize_8da4w(module: nn.Module, group_size: int = GROUP_SIZE,
                   codes: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                   signed_scales: bool = False, fit: bool = False) -> list[str]:
    """torchao 8da4w in place on every nn.Linear except routers (int8 dynamic activations, int4 group weights).

    ``codes`` (:func:`checkpoint_linear_codes`; model weight names, resolved under a
    :class:`StaticMobileMoE`'s ``model``): those linears get the checkpoint's own codes and scales
    instead of torchao re-quantizing their decoded values, in the form XNNPACK takes
    (:func:`xnnpack_int4`; zero points 0), each wrapped in :class:`Int4StepCorrection` for the entries
    that form cannot hold, so the weights are exactly the checkpoint's (XNNPACK then rounds group
    scales to bf16). ``fit``: least-squares fits instead of the correction (smaller, not exact).
    ``signed_scales``: the checkpoint's signed scales as they are (exact in PyTorch with no
    correction, but XNNPACK refuses to load the program: diagnostics only). Each checkpoint weight
    must decode to the linear's weight bit for bit, else :class:`ExportError`. Returns the fully
    qualified names of the linears that got checkpoint codes (as they were before wrapping)."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    config = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(group_size))

    def keep(mod: nn.Module, fqn: str) -> bool:
        return isinstance(mod, nn.Linear) and not fqn.endswith("router") and mod.in_features % group_size == 0

    prefix = "model." if isinstance(module, StaticMobileMoE) else ""
    chosen = {}
    if codes and group_size == GROUP_SIZE:
        for fqn, mod in module.named_modules():
            if not (keep(mod, fqn) and fqn.startswith(prefix)):
                continue
            found = codes.get(fqn[len(prefix):] + ".weight")
            if found is None:
                continue
            if not torch.equal(dequant_along_in(*found), mod.weight.detach().float()):
                raise ExportError(f"{fqn}: the weight is not the value of the checkpoint's INT4 codes (the program "
                                  "would mix two models): build it from load_model(ckpt) unchanged")
            chosen[fqn] = found
    quantize_(module, config, filter_fn=keep)
    for fqn, (c, sc) in chosen.items():
        lin = module.get_submodule(fqn)
        w = lin.weight
        if tuple(w.qdata.shape) != tuple(c.shape) or tuple(w.scale.shape) != tuple(sc.shape):
            raise ExportError(f"{fqn}: torchao's int4 weight layout {tuple(w.qdata.shape)} / {tuple(w.scale.shape)} "
                              f"is not the checkpoint's {tuple(c.shape)} / {tuple(sc.shape)}")
        qc, qs = (c, sc) if signed_scales else xnnpack_int4(c, sc, fit=fit)
        with torch.no_grad():
            w.qdata.copy_(qc)
            w.scale.copy_(qs.to(w.scale.dtype))
            w.zero_point.zero_()
        fix = None if signed_scales or fit else Int4StepCorrection.residual(c, sc)
        if fix is not None:
            parent, _, leaf = fqn.rpartition(".")
            setattr(module.get_submodule(parent) if parent else module, leaf, Int4StepCorrection(lin, fix))
    return list(chosen)


PREFILL_CHUNK = 8  # tokens per prefill call; each extra method costs one more lowering at export


def default_experts(model: MobileMoEForCausalLM, quantize: str | None) -> str:
    """The expert dispatch :func:`export_executorch` uses: fp32 gathers the chosen experts; 8da4w
    routes through ``quantized_moe_ffn`` (INT4, chosen experts only) unless the config is one the op
    cannot compute (:func:`moe_op_unsupported`), which falls back to dense experts with a warning."""
    if quantize in (None, "none"):
        return "gather"
    blocks = [layer.feed_forward for layer in model.model.layers if isinstance(layer.feed_forward, MoEBlock)]
    reason = next((r for r in (moe_op_unsupported(b.cfg, b.expert_bias) for b in blocks) if r), None)
    if reason:
        warnings.warn(f"ExecuTorch 8da4w export: {reason}, so every routed expert runs on every token "
                      "(dense experts)", stacklevel=3)
        return "dense"
    return "op"


def export_executorch(ckpt: str | os.PathLike, out: str | os.PathLike, max_seq_len: int = 256,
                      quantize: str | None = "8da4w", prefill_chunk: int = PREFILL_CHUNK,
                      experts: str | None = None) -> Path:
    """Write ``out`` (.pte) from a checkpoint: torch.export -> XNNPACK -> ExecuTorch.
    ``quantize``: "8da4w" (torchao int8-dynamic x int4 group-32 linears, an INT4 checkpoint's own codes
    where it has them; routed experts INT4 through ``quantized_moe_ffn``) or None / "none" (fp32,
    gathered experts); ``experts``: the dispatch
    (:data:`EXPERT_DISPATCH`, default :func:`default_experts`); ``prefill_chunk``: see :func:`export_module`."""
    _require()
    if quantize not in (None, "none", "8da4w"):
        raise ExportError(f"unknown ExecuTorch quantization {quantize!r}: choose 8da4w or none")
    model = _load(ckpt)
    experts = experts or default_experts(model, quantize)
    module = static_module(model, max_seq_len, experts, checkpoint_expert_codes(ckpt) if experts == "op" else None)
    if quantize == "8da4w":
        quantize_8da4w(module, codes=checkpoint_linear_codes(ckpt))
    return export_module(module, out, min(prefill_chunk, module.cache.max_len))


def export_module(module: StaticMobileMoE, out: str | os.PathLike, prefill_chunk: int = 0) -> Path:
    """torch.export -> XNNPACK -> ``out`` (.pte) for an already built (maybe quantized) module:
    method ``forward`` takes one token, ``prefill`` (when ``prefill_chunk`` > 1) that many."""
    _require()
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.init_mutable_pass import InitializedMutableBufferPass

    # The cache's current contents become the program's initial state: start from zeros even if the
    # module was run eagerly before.
    module.cache.reset()
    lengths = {"forward": 1, **({"prefill": prefill_chunk} if prefill_chunk > 1 else {})}
    with torch.no_grad():
        programs = {name: torch.export.export(module, (torch.zeros(1, T, dtype=torch.long),
                                                       torch.zeros(1, dtype=torch.long)), strict=False)
                    for name, T in lengths.items()}
    edge = to_edge_transform_and_lower(programs, partitioner=[XnnpackPartitioner()])
    # the caches start as zeros (not "meaningless"): masked slots must not hold NaN garbage; and
    # both methods read and write the same cache
    prog = edge.to_executorch(ExecutorchBackendConfig(
        passes=[InitializedMutableBufferPass(["k_cache", "v_cache"])],
        memory_planning_pass=MemoryPlanningPass(share_mutable_buffers=True)))
    with atomic_path(out) as tmp:
        tmp.write_bytes(prog.buffer)
    return Path(out)


class PteRunner:
    """Run an exported ``.pte`` with ExecuTorch's Python runtime (the KV cache lives in the method)."""

    def __init__(self, path: str | os.PathLike) -> None:
        _require()
        from executorch.runtime import Runtime

        try:  # registers llama::quantized_moe_ffn.out, which routed programs call (nothing else loads it)
            _load_moe_op()
        except MobileMoEError:
            pass  # a program without the op still runs; one with it fails in load_method, naming the op
        self.program = Runtime.get().load_program(Path(path))
        self.method = self.program.load_method("forward")
        self.prefill, self.chunk = None, 1
        if "prefill" in self.program.method_names:
            self.prefill = self.program.load_method("prefill")
            self.chunk = self.prefill.metadata.input_tensor_meta(0).sizes()[1]

    def _run(self, method, tokens: list[int], pos: int) -> torch.Tensor:
        out = method.execute([torch.tensor([tokens], dtype=torch.long), torch.tensor([pos], dtype=torch.long)])
        return out[0][0]

    def step(self, token: int, pos: int) -> torch.Tensor:
        """Logits [V] after feeding ``token`` at position ``pos``."""
        return self._run(self.method, [token], pos)[-1]

    def __call__(self, tokens: list[int], start_pos: int) -> torch.Tensor:
        """Logits [T, V] after each of ``tokens`` from ``start_pos``: whole prefill chunks, then one at a time."""
        n_chunked = len(tokens) // self.chunk * self.chunk if self.prefill is not None else 0
        parts = [self._run(self.prefill, tokens[i:i + self.chunk], start_pos + i)
                 for i in range(0, n_chunked, self.chunk)]
        parts += [self._run(self.method, [t], start_pos + i) for i, t in enumerate(tokens) if i >= n_chunked]
        return torch.cat(parts) if parts else torch.empty(0)


def routed_expert_blob_bytes(module: nn.Module) -> list[int]:
    """Per :class:`QuantizedMoE` layer of ``module`` (in order), the bytes ONE routed expert's blobs
    take in the program: its ``packed_w13`` row plus its ``packed_w2`` row (headers, nibble codes, fp32
    scales and int32 code sums), i.e. what ``quantized_moe_ffn`` reads for each expert it runs."""
    return [int(m.packed_w13[0].numel() * m.packed_w13.element_size() + m.packed_w2[0].numel()
                * m.packed_w2.element_size()) for m in module.modules() if isinstance(m, QuantizedMoE)]
