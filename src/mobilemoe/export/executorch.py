"""MobileMoE -> ExecuTorch ``.pte`` (torch.export -> XNNPACK partitioner), optionally 8da4w.

The exported program is :class:`StaticMobileMoE`, an export-friendly re-statement of the reference
forward (same weights, same math):

* ``forward(tokens [1, T] int64, input_pos [1] int64) -> logits [1, T, V]``. The module accepts any
  T (and torch.export traces it with a dynamic T), but the ``.pte`` is exported with T = 1: with
  executorch 1.5.1, ``to_edge_transform_and_lower`` (and ``to_edge().to_backend(XNNPACK)``)
  specialise the dynamic length to the example's size, so a dynamic-T program rejects other lengths at
  run time. Prefill therefore feeds the prompt one token per call (:class:`PteRunner`); decode is T = 1
  anyway. A batched-prefill method is future work (e.g. ExecuTorch's custom SDPA/KV-cache ops).
* Static KV cache: per layer ``k_cache`` / ``v_cache`` buffers [1, n_kv, max_seq_len, D], written
  with ``index_copy_`` at ``input_pos + arange(T)``; attention runs over the whole cache with the mask
  ``key_pos <= query_pos`` (which also hides the unwritten slots). The buffers are mutated in place
  by the program, so the cache lives inside the loaded method between calls.
* MoE dispatch without data-dependent shapes: the router, ``topk`` of (scores + expert_bias) and the
  normalised, scaled weights are computed as usual, then scattered into a dense [N, E] weight matrix
  (zeros for experts a token did not choose), and EVERY expert runs on every token, its output scaled
  by that column. Trade-off: E/k times the routed-expert FLOPs (16/4 = 4x on the tiny preset, 60/4 =
  15x on MobileMoE-S) for a static graph of plain ``nn.Linear`` ops that XNNPACK lowers and torchao
  quantizes; the exact dispatch (argsort + per-expert slices, as in :mod:`mobilemoe.moe`) has
  data-dependent shapes that torch.export cannot trace without custom ops. Decode (T = 1) is the
  on-device hot path and is memory-bound: every expert's weights are read either way once E*k tokens
  are batched, but at T = 1 the dense form reads all E experts' weights instead of k.
* Experts are unstacked into per-expert ``nn.Linear`` modules (``gate_up`` H -> 2I, ``down``
  I -> H) so torchao's 8da4w (int8 dynamic per-token activations, int4 symmetric group-32 weights)
  and XNNPACK's linear kernels apply to them. Routers stay fp32 and unquantized (as in the
  checkpoint format); the embedding lookup stays fp32.

8da4w re-quantizes the (exactly decoded) weights with torchao's own scales and also quantizes
activations, so its logits differ from the eager fp32 model by quantization error; ``quantize=None``
exports fp32 and matches the eager model to float rounding.

Tested with executorch 1.5.1 + torchao 0.18.0 (installed ``--no-deps``) beside torch 2.13.0; they
need ``ruamel.yaml`` and ``flatbuffers`` at import.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mobilemoe.config import MobileMoEConfig
from mobilemoe.errors import MobileMoEError
from mobilemoe.export.common import ExportError


def _require():
    try:
        import executorch  # noqa: F401
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner  # noqa: F401
    except ImportError as exc:
        raise MobileMoEError(f"ExecuTorch is not importable ({exc}): pip install --no-deps executorch==1.5.1 "
                             "torchao==0.18.0 ruamel.yaml flatbuffers") from None


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class _Norm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().float().clone(), requires_grad=False)
        self.eps = eps

    def forward(self, x):
        return _rms(x, self.eps) * self.weight


def _linear(w: torch.Tensor, b: torch.Tensor | None = None) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    with torch.no_grad():
        lin.weight.copy_(w.float())
        if b is not None:
            lin.bias.copy_(b.float())
    lin.requires_grad_(False)
    return lin


class _SwiGLU(nn.Module):
    def __init__(self, mod) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = _linear(mod.gate_proj.weight), _linear(mod.up_proj.weight)
        self.down_proj = _linear(mod.down_proj.weight)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _Expert(nn.Module):
    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        super().__init__()
        self.width = down.shape[0]
        self.gate_up = _linear(gate_up.t())  # [H, 2I] (y = x @ W) -> Linear weight [2I, H]
        self.down = _linear(down.t())

    def forward(self, x):
        gate, up = self.gate_up(x).split(self.width, dim=-1)
        return self.down(F.silu(gate) * up)


class _DenseMoE(nn.Module):
    """Router + every expert on every token, masked by the dense top-k weight matrix."""

    def __init__(self, cfg: MobileMoEConfig, block) -> None:
        super().__init__()
        self.cfg = cfg
        self.router = _linear(block.router.weight)
        self.register_buffer("expert_bias", block.expert_bias.detach().float().clone())
        E = cfg.num_local_experts
        self.experts = nn.ModuleList(_Expert(block.experts.gate_up_proj[e], block.experts.down_proj[e])
                                     for e in range(E))
        self.shared_expert = _SwiGLU(block.shared_expert) if block.shared_expert is not None else None

    def forward(self, h):  # h [N, H]
        logits = self.router(h)
        scores = torch.sigmoid(logits) if self.cfg.router_type == "sigmoid" else torch.softmax(logits, -1)
        _, ids = torch.topk(scores + self.expert_bias, self.cfg.num_experts_per_tok, dim=-1)
        w = scores.gather(-1, ids)
        if self.cfg.norm_topk_prob:
            w = w / w.sum(-1, keepdim=True)
        w = w * self.cfg.routed_scaling_factor
        dense = torch.zeros_like(scores).scatter(-1, ids, w)  # [N, E]
        out = self.shared_expert(h) if self.shared_expert is not None else torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            out = out + expert(h) * dense[:, e:e + 1]
        return out


class _Layer(nn.Module):
    def __init__(self, cfg: MobileMoEConfig, i: int, layer, max_seq_len: int) -> None:
        super().__init__()
        self.cfg, self.i = cfg, i
        a = layer.self_attn
        self.nh, self.nkv, self.D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.input_layernorm = _Norm(layer.input_layernorm.weight, cfg.rms_norm_eps)
        self.q_proj, self.k_proj = _linear(a.q_proj.weight, a.q_proj.bias), _linear(a.k_proj.weight, a.k_proj.bias)
        self.v_proj, self.o_proj = _linear(a.v_proj.weight, a.v_proj.bias), _linear(a.o_proj.weight, a.o_proj.bias)
        self.post_attention_layernorm = _Norm(layer.post_attention_layernorm.weight, cfg.rms_norm_eps)
        self.ffn = _DenseMoE(cfg, layer.feed_forward) if layer.is_moe else _SwiGLU(layer.feed_forward)
        self.is_moe = layer.is_moe
        shape = (1, self.nkv, max_seq_len, self.D)
        self.register_buffer("k_cache", torch.zeros(shape), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape), persistent=False)

    def _rope(self, x, cos, sin):  # x [1, h, T, D]; adjacent pairs
        x0, x1 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)

    def forward(self, x, cos, sin, positions, mask):
        B, T, _ = x.shape
        h = self.input_layernorm(x)
        q = self.q_proj(h).view(B, T, self.nh, self.D).transpose(1, 2)
        k = self.k_proj(h).view(B, T, self.nkv, self.D).transpose(1, 2)
        v = self.v_proj(h).view(B, T, self.nkv, self.D).transpose(1, 2)
        if self.cfg.uses_rope(self.i):
            q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
        if self.cfg.use_qk_norm:
            q, k = _rms(q, self.cfg.rms_norm_eps), _rms(k, self.cfg.rms_norm_eps)
        self.k_cache.index_copy_(2, positions, k)
        self.v_cache.index_copy_(2, positions, v)
        # GQA without repeat: query heads grouped per KV head [1, nkv, rep, T, D]; explicit softmax
        # attention (the SDPA decomposition specialises the dynamic length during lowering).
        rep = self.nh // self.nkv
        q5 = q.view(B, self.nkv, rep, T, self.D)
        scores = (q5 @ self.k_cache.unsqueeze(2).transpose(-1, -2)) * (1.0 / math.sqrt(self.D))
        scores = scores.masked_fill(~mask, float("-inf"))  # [1, nkv, rep, T, S]
        att = (torch.softmax(scores, dim=-1) @ self.v_cache.unsqueeze(2)).view(B, self.nh, T, self.D)
        x = x + self.o_proj(att.transpose(1, 2).reshape(B, T, -1))
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            return x + self.ffn(h.reshape(-1, h.shape[-1])).reshape(h.shape)
        return x + self.ffn(h)


class StaticMobileMoE(nn.Module):
    """Export-friendly MobileMoE: ``forward(tokens [1, T], input_pos [1]) -> logits [1, T, V]``."""

    def __init__(self, model, max_seq_len: int) -> None:
        super().__init__()
        cfg = model.config
        self.cfg, self.max_seq_len = cfg, max_seq_len
        self.embed = nn.Embedding.from_pretrained(model.model.embed_tokens.weight.detach().float().clone())
        self.layers = nn.ModuleList(_Layer(cfg, i, layer, max_seq_len) for i, layer in enumerate(model.model.layers))
        self.norm = _Norm(model.model.norm.weight, cfg.rms_norm_eps)
        self.lm_head = _linear(model.output_weight)
        self.register_buffer("inv_freq", model.inv_freq.detach().float().clone(), persistent=False)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        T = tokens.shape[1]
        positions = input_pos + torch.arange(T, dtype=torch.long)
        angles = positions.float()[:, None] * self.inv_freq[None, :]
        cos, sin = angles.cos(), angles.sin()
        mask = torch.arange(self.max_seq_len)[None, :] <= positions[:, None]  # [T, S]
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin, positions, mask)
        return self.lm_head(self.norm(x))


def check_executorch(cfg: MobileMoEConfig) -> None:
    """Everything the reference model runs is representable; only the batch is fixed at 1."""
    if cfg.num_local_experts > 512:
        raise ExportError(f"cannot export to ExecuTorch: num_local_experts={cfg.num_local_experts} unrolled experts "
                          "would make an impractically large graph")


def build_static(ckpt: str | os.PathLike, max_seq_len: int = 256) -> StaticMobileMoE:
    from mobilemoe.checkpoint import load_model

    model = load_model(ckpt, dtype=torch.float32).eval()
    check_executorch(model.config)
    max_seq_len = min(max_seq_len, model.config.max_position_embeddings)
    return StaticMobileMoE(model, max_seq_len).eval()


def quantize_8da4w(module: nn.Module, group_size: int = 32) -> None:
    """torchao 8da4w in place on every nn.Linear except routers (int8 dynamic activations, int4 group weights)."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    config = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(group_size))

    def keep(mod: nn.Module, fqn: str) -> bool:
        return isinstance(mod, nn.Linear) and not fqn.endswith("router") and mod.in_features % group_size == 0

    quantize_(module, config, filter_fn=keep)


def export_executorch(ckpt: str | os.PathLike, out: str | os.PathLike, max_seq_len: int = 256,
                      quantize: str | None = "8da4w") -> Path:
    """Write ``out`` (.pte) from a checkpoint: torch.export (T = 1) -> XNNPACK -> ExecuTorch.
    ``quantize``: "8da4w" (torchao, int4 group-32 weights) or None / "none" (fp32)."""
    _require()
    if quantize not in (None, "none", "8da4w"):
        raise ExportError(f"unknown ExecuTorch quantization {quantize!r}: choose 8da4w or none")
    module = build_static(ckpt, max_seq_len)
    if quantize == "8da4w":
        quantize_8da4w(module)
    return export_module(module, out)


def export_module(module: StaticMobileMoE, out: str | os.PathLike) -> Path:
    """torch.export (T = 1) -> XNNPACK -> ``out`` (.pte) for an already built (maybe quantized) module."""
    _require()
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes.init_mutable_pass import InitializedMutableBufferPass

    # The caches' current contents become the program's initial state: start from zeros even if the
    # module was run eagerly before.
    for layer in module.layers:
        layer.k_cache.zero_()
        layer.v_cache.zero_()
    # One token per call (see the module docstring: a dynamic length gets specialised by lowering).
    example = (torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    with torch.no_grad():
        ep = torch.export.export(module, example, strict=False)
    edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])
    # the caches start as zeros (not "meaningless"): masked slots must not hold NaN garbage
    prog = edge.to_executorch(ExecutorchBackendConfig(passes=[InitializedMutableBufferPass(["k_cache", "v_cache"])]))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_bytes(prog.buffer)
    os.replace(tmp, out)
    return out


class PteRunner:
    """Run an exported ``.pte`` with ExecuTorch's Python runtime (the KV cache lives in the method)."""

    def __init__(self, path: str | os.PathLike) -> None:
        _require()
        from executorch.runtime import Runtime

        self.program = Runtime.get().load_program(Path(path))
        self.method = self.program.load_method("forward")

    def step(self, token: int, pos: int) -> torch.Tensor:
        """Logits [V] after feeding ``token`` at position ``pos``."""
        out = self.method.execute([torch.tensor([[token]], dtype=torch.long), torch.tensor([pos], dtype=torch.long)])
        return out[0][0, -1]

    def __call__(self, tokens: list[int], start_pos: int) -> torch.Tensor:
        """Logits [T, V] after each of ``tokens``, fed one at a time from ``start_pos``."""
        return torch.stack([self.step(t, start_pos + i) for i, t in enumerate(tokens)])
