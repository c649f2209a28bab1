"""Independent reference implementations written straight from shared/specs/mobilemoe-checkpoint.md.

Deliberately naive (loops over tokens and heads, float64) so they share no code with the model.
"""

import math

import torch
import torch.nn.functional as F

from mobilemoe.model import MobileMoEForCausalLM, rope_inv_freq
from mobilemoe.moe import MoEBlock


def naive_moe(block: MoEBlock, x: torch.Tensor) -> tuple[torch.Tensor, list[list[int]]]:
    cfg = block.cfg
    Wr = block.router.weight.double()
    bias = block.expert_bias.double()
    out, chosen_all = [], []
    for h in x.reshape(-1, x.shape[-1]).double():
        logits = Wr @ h
        scores = torch.sigmoid(logits) if cfg.router_type == "sigmoid" else torch.softmax(logits, -1)
        sel = (scores + bias).tolist()
        # top-k, ties to the lower index
        chosen = sorted(range(len(sel)), key=lambda e: (-sel[e], e))[: cfg.num_experts_per_tok]
        w = scores[chosen]
        if cfg.norm_topk_prob:
            w = w / w.sum()
        w = w * cfg.routed_scaling_factor
        y = torch.zeros_like(h)
        for weight, e in zip(w, chosen):
            gate_up = h @ block.experts.gate_up_proj[e].double()
            gate, up = gate_up[: cfg.intermediate_size], gate_up[cfg.intermediate_size:]
            y += weight * ((F.silu(gate) * up) @ block.experts.down_proj[e].double())
        if block.shared_expert is not None:
            se = block.shared_expert
            y += se.down_proj.weight.double() @ (F.silu(se.gate_proj.weight.double() @ h) * (se.up_proj.weight.double() @ h))
        out.append(y)
        chosen_all.append(chosen)
    return torch.stack(out).reshape(x.shape).float(), chosen_all


def spec_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (2i, 2i+1) by position * inv_freq[i], via complex multiplication."""
    pairs = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)).contiguous())
    rot = torch.polar(torch.ones_like(inv_freq.double()), positions.double()[:, None] * inv_freq.double()[None])
    return torch.view_as_real(pairs * rot).flatten(-2).to(x.dtype)


def spec_forward(model: MobileMoEForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """A direct, loop-heavy reading of the spec's forward semantics (batch 1)."""
    cfg = model.config
    eps, D = cfg.rms_norm_eps, cfg.head_dim
    norm = lambda v, w=None: v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + eps) * (1 if w is None else w)
    inv_freq = rope_inv_freq(cfg)
    T = ids.shape[1]
    pos = torch.arange(T)
    x = model.model.embed_tokens.weight[ids[0]]
    for i, layer in enumerate(model.model.layers):
        a = layer.self_attn
        h = norm(x, layer.input_layernorm.weight)
        q = (h @ a.q_proj.weight.T).view(T, cfg.num_attention_heads, D)
        k = (h @ a.k_proj.weight.T).view(T, cfg.num_key_value_heads, D)
        v = (h @ a.v_proj.weight.T).view(T, cfg.num_key_value_heads, D)
        if cfg.uses_rope(i):
            q = spec_rope(q.transpose(0, 1), pos, inv_freq).transpose(0, 1)
            k = spec_rope(k.transpose(0, 1), pos, inv_freq).transpose(0, 1)
        if cfg.use_qk_norm:
            q, k = norm(q), norm(k)
        group = cfg.num_attention_heads // cfg.num_key_value_heads
        heads = []
        for j in range(cfg.num_attention_heads):
            kv = j // group  # query head j uses KV head j // (nH / nKV)
            scores = q[:, j] @ k[:, kv].T / math.sqrt(D)
            scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
            heads.append(torch.softmax(scores, -1) @ v[:, kv])
        x = x + torch.cat(heads, -1) @ a.o_proj.weight.T
        h = norm(x, layer.post_attention_layernorm.weight)
        if layer.is_moe:
            x = x + naive_moe(layer.feed_forward, h)[0]
        else:
            ff = layer.feed_forward
            x = x + (F.silu(h @ ff.gate_proj.weight.T) * (h @ ff.up_proj.weight.T)) @ ff.down_proj.weight.T
    return (norm(x, model.model.norm.weight) @ model.output_weight.T).unsqueeze(0)


