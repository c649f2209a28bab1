"""MobileMoE for transformers (``trust_remote_code``), written by ``mobilemoe export hf``.

Self-contained: plain PyTorch + transformers. Same forward as the mobilemoe reference model:
RMSNorm; GQA attention without (or with) biases; RoPE on ADJACENT pairs (2i, 2i+1) with optional
llama3 frequency scaling; weightless per-head QK-norm; MoE layers with a sigmoid (or softmax) router,
a selection-only ``expert_bias``, normalised top-k weights times ``routed_scaling_factor``, stacked
experts ``gate_up_proj`` [E, H, 2I] / ``down_proj`` [E, I, H] (``y = x @ W[e]``) and an ungated shared
SwiGLU expert; tied embeddings. No KV cache: every call recomputes the whole sequence (slow but simple
``generate`` with ``use_cache=False``).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_mobilemoe import MobileMoEConfig


def _rms(x, eps):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class MobileMoERMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return _rms(x, self.eps) * self.weight


def _inv_freq(config):
    D = config.head_dim
    inv = config.rope_theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    rs = getattr(config, "mobilemoe_rope_scaling", None)
    if not rs:
        return inv.float()
    factor, old = rs["factor"], rs["original_max_position_embeddings"]
    low, high = rs["low_freq_factor"], rs["high_freq_factor"]
    wavelen = 2 * math.pi / inv
    if high > low:
        scaled = torch.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        mid = (1 - smooth) * inv / factor + smooth * inv
        scaled = torch.where((wavelen >= old / high) & (wavelen <= old / low), mid, scaled)
    else:
        scaled = torch.where(wavelen < old / high, inv, inv / factor)
    return scaled.float()


def _rope(x, cos, sin):
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2).to(x.dtype)


class MobileMoEAttention(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.config, self.layer = config, layer
        H, D, b = config.hidden_size, config.head_dim, config.attention_bias
        self.nh, self.nkv, self.D = config.num_attention_heads, config.num_key_value_heads, D
        self.q_proj = nn.Linear(H, self.nh * D, bias=b)
        self.k_proj = nn.Linear(H, self.nkv * D, bias=b)
        self.v_proj = nn.Linear(H, self.nkv * D, bias=b)
        self.o_proj = nn.Linear(self.nh * D, H, bias=b)

    def forward(self, x, cos, sin, mask):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.D).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.nkv, self.D).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.nkv, self.D).transpose(1, 2)
        if self.config.no_rope_layers[self.layer]:
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        if self.config.use_qk_norm:
            q, k = _rms(q, self.config.rms_norm_eps), _rms(k, self.config.rms_norm_eps)
        rep = self.nh // self.nkv
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MobileMoESwiGLU(nn.Module):
    def __init__(self, hidden, width):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.up_proj = nn.Linear(hidden, width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MobileMoEExperts(nn.Module):
    def __init__(self, E, H, I):
        super().__init__()
        self.width = I
        self.gate_up_proj = nn.Parameter(torch.zeros(E, H, 2 * I))
        self.down_proj = nn.Parameter(torch.zeros(E, I, H))

    def forward(self, x, ids, weights):
        out = torch.zeros_like(x)
        for e in torch.unique(ids).tolist():
            tok, slot = (ids == e).nonzero(as_tuple=True)
            gate, up = (x[tok] @ self.gate_up_proj[e]).split(self.width, dim=-1)
            y = (F.silu(gate) * up) @ self.down_proj[e]
            out.index_add_(0, tok, y * weights[tok, slot].unsqueeze(-1).to(x.dtype))
        return out


class MobileMoEBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        E, H = config.num_local_experts, config.hidden_size
        self.router = nn.Linear(H, E, bias=False)
        self.expert_bias = nn.Parameter(torch.zeros(E), requires_grad=False)
        self.experts = MobileMoEExperts(E, H, config.intermediate_size)
        self.shared_expert = (MobileMoESwiGLU(H, config.intermediate_size_mlp)
                              if config.num_shared_experts else None)

    def forward(self, x):
        shape = x.shape
        h = x.reshape(-1, shape[-1])
        logits = F.linear(h.float(), self.router.weight.float())
        scores = torch.sigmoid(logits) if self.config.router_type == "sigmoid" else torch.softmax(logits, -1)
        order = torch.sort(scores + self.expert_bias.float(), dim=-1, descending=True, stable=True).indices
        ids = order[:, : self.config.num_experts_per_tok]
        w = scores.gather(-1, ids)
        if self.config.norm_topk_prob:
            w = w / w.sum(-1, keepdim=True)
        w = w * self.config.routed_scaling_factor
        out = self.experts(h, ids, w)
        if self.shared_expert is not None:
            out = out + self.shared_expert(h)
        return out.reshape(shape)


class MobileMoEDecoderLayer(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.input_layernorm = MobileMoERMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MobileMoEAttention(config, layer)
        self.post_attention_layernorm = MobileMoERMSNorm(config.hidden_size, config.rms_norm_eps)
        is_moe = config.num_local_experts > 0 and (layer + 1) % config.interleave_moe_layer_step == 0
        self.feed_forward = (MobileMoEBlock(config) if is_moe
                             else MobileMoESwiGLU(config.hidden_size, config.intermediate_size_mlp))

    def forward(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.feed_forward(self.post_attention_layernorm(x))


class MobileMoEPreTrainedModel(PreTrainedModel):
    config_class = MobileMoEConfig
    base_model_prefix = "model"
    _no_split_modules = ["MobileMoEDecoderLayer"]

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, std)
        elif isinstance(module, MobileMoERMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, MobileMoEExperts):
            nn.init.normal_(module.gate_up_proj, 0.0, std)
            nn.init.normal_(module.down_proj, 0.0, std)
        elif isinstance(module, MobileMoEBlock):
            nn.init.zeros_(module.expert_bias)


class MobileMoEModel(MobileMoEPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(MobileMoEDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = MobileMoERMSNorm(config.hidden_size, config.rms_norm_eps)
        self.register_buffer("inv_freq", _inv_freq(config), persistent=False)
        self.post_init()

    def forward(self, input_ids):
        T = input_ids.shape[1]
        inv_freq = _inv_freq(self.config).to(input_ids.device)  # recomputed: robust to meta-device loading
        angles = torch.arange(T, device=input_ids.device, dtype=torch.float32)[:, None] * inv_freq[None, :]
        cos, sin = angles.cos(), angles.sin()
        mask = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.norm(x)


class MobileMoEForCausalLM(MobileMoEPreTrainedModel, GenerationMixin):
    def __init__(self, config):
        super().__init__(config)
        self.model = MobileMoEModel(config)
        # Tied models have no lm_head module: logits use the embedding matrix directly.
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size,
                                                                        bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        return {"input_ids": input_ids}

    def forward(self, input_ids=None, attention_mask=None, labels=None, return_dict=True, **kwargs):
        x = self.model(input_ids)
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(x, weight)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)
