"""The MobileMoE decoder in plain PyTorch (the reference implementation).

Semantics follow ``shared/specs/mobilemoe-checkpoint.md`` so released weights load unchanged:
RMSNorm, GQA attention without biases, RoPE on ADJACENT pairs (2i, 2i+1) with llama3 frequency
scaling, weightless QK-norm, SwiGLU, MoE blocks (see :mod:`mobilemoe.moe`) on every
``interleave_moe_layer_step``-th layer and dense SwiGLU FFNs elsewhere, tied embeddings.

Module names equal the checkpoint tensor names (:mod:`mobilemoe.layout`), so ``state_dict()`` is the
checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mobilemoe.config import MobileMoEConfig
from mobilemoe.moe import MoEBlock, RouterOutput, SwiGLU


def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / sqrt(mean(x^2) + eps)`` computed in fp32, returned in x's dtype."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.eps) * self.weight


def rope_inv_freq(cfg: MobileMoEConfig) -> torch.Tensor:
    """inv_freq[i] = theta^(-2i/D), with llama3 scaling applied when configured."""
    D = cfg.head_dim
    inv_freq = cfg.rope_theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    rs = cfg.rope_scaling
    if rs is None:
        return inv_freq.float()
    factor, old_len = rs["factor"], rs["original_max_position_embeddings"]
    low, high = rs["low_freq_factor"], rs["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    if high > low:  # smooth interpolation band between the two wavelengths
        smooth = (old_len / wavelen - low) / (high - low)
        mid = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        in_band = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        scaled = torch.where(in_band, mid, scaled)
    else:  # degenerate form (low == high): below the wavelength keep, otherwise divide
        scaled = torch.where(wavelen < high_freq_wavelen, inv_freq, inv_freq / factor)
    return scaled.float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (2i, 2i+1). x [B, heads, T, D]; cos, sin [T, D/2]."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)


class KVCache:
    """A preallocated static KV cache: per layer K and V of shape [B, n_kv_heads, max_len, D]."""

    def __init__(self, cfg: MobileMoEConfig, batch: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.max_len = max_len
        self.length = 0  # positions filled so far

    @staticmethod
    def attention_mask(start: int, T: int, S: int, device: torch.device) -> tuple[torch.Tensor | None, bool]:
        """(attn_mask, is_causal) for T queries from ``start`` over the S cached keys returned by update."""
        if T == 1:
            return None, False  # one new query sees every cached position
        if S == T:
            return None, True
        # a chunk appended after `start` cached positions
        pos_q = torch.arange(start, start + T, device=device)[:, None]
        return torch.arange(S, device=device)[None, :] <= pos_q, False

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: position {end} > max_len {self.max_len}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: MobileMoEConfig, layer: int) -> None:
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        H, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(H, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(H, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(H, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, H, bias=bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int,
                cache: KVCache | None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        if self.cfg.uses_rope(self.layer):
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.cfg.use_qk_norm:  # weightless; commutes with RoPE, which preserves each head's norm
            q, k = rms_norm(q, self.cfg.rms_norm_eps), rms_norm(k, self.cfg.rms_norm_eps)
        if cache is not None:
            k, v = cache.update(self.layer, start, k, v)
            mask, causal = cache.attention_mask(start, T, k.shape[2], x.device)
        else:
            mask, causal = None, T > 1
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: MobileMoEConfig, layer: int) -> None:
        super().__init__()
        self.is_moe = cfg.is_moe_layer(layer)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.feed_forward = MoEBlock(cfg) if self.is_moe else SwiGLU(cfg.hidden_size, cfg.intermediate_size_mlp)

    def forward(self, x, cos, sin, start, cache) -> tuple[torch.Tensor, RouterOutput | None]:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, start, cache)
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            ff, routing = self.feed_forward(h)
        else:
            ff, routing = self.feed_forward(h), None
        return x + ff, routing


@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # [B, T, V] (or [B, 1, V] with last_only)
    # Per MoE layer (in layer order), present when return_router=True. Tokens flattened [B*T, ...].
    router: list[RouterOutput] = field(default_factory=list)
    moe_layers: list[int] = field(default_factory=list)


class MobileMoEModel(nn.Module):
    def __init__(self, cfg: MobileMoEConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MobileMoEForCausalLM(nn.Module):
    """Decoder-only MoE LM. ``forward(input_ids, start_pos, cache)`` returns logits and routing."""

    def __init__(self, cfg: MobileMoEConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = MobileMoEModel(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.init_buffers()
        self.reset_parameters()

    def init_buffers(self) -> None:
        """(Re)compute the non-persistent RoPE table (needed after building on the meta device)."""
        self.register_buffer("inv_freq", rope_inv_freq(self.config), persistent=False)

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """Normal(0, initializer_range) weights; residual-output projections scaled by 1/sqrt(2L)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        out_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, p in self.named_parameters():
            if p.is_meta:
                continue  # built on the meta device to be filled from a checkpoint
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.fill_(1.0)
            elif name.endswith("expert_bias") or name.endswith(".bias"):
                p.zero_()
            else:
                is_out = name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj"))
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * (out_std if is_out else std))

    @property
    def output_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def rope_tables(self, start: int | torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [length, D/2] for positions start.. (``start`` may be a [1] tensor, for torch.export)."""
        pos = start + torch.arange(length, device=self.inv_freq.device, dtype=torch.float32)
        angles = pos[:, None] * self.inv_freq[None, :]
        return angles.cos(), angles.sin()

    def new_cache(self, batch: int = 1, max_len: int | None = None) -> KVCache:
        dtype = self.model.embed_tokens.weight.dtype
        return KVCache(self.config, batch, max_len or self.config.max_position_embeddings, dtype,
                       self.model.embed_tokens.weight.device)

    def forward(self, input_ids: torch.Tensor, start_pos: int = 0, cache: KVCache | None = None,
                return_router: bool = False, last_only: bool = False) -> CausalLMOutput:
        T = input_ids.shape[1]
        if start_pos + T > self.config.max_position_embeddings:
            raise ValueError(f"sequence end {start_pos + T} exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        cos, sin = self.rope_tables(start_pos, T)
        x = self.model.embed_tokens(input_ids)
        out = CausalLMOutput(logits=torch.empty(0))
        for i, layer in enumerate(self.model.layers):
            x, routing = layer(x, cos, sin, start_pos, cache)
            if return_router and routing is not None:
                out.router.append(routing)
                out.moe_layers.append(i)
        if cache is not None:
            cache.length = start_pos + T
        x = self.model.norm(x)
        if last_only:
            x = x[:, -1:]
        out.logits = F.linear(x, self.output_weight)
        return out
