"""Which tensors a config implies: names, shapes and roles.

This is the single source of truth for tensor names. The model's ``state_dict()`` keys equal these
names (a test checks it), the checkpoint module validates files against them, the accounting
module counts parameters, FLOPs and bytes from them, and the INT4 quantizer derives its
``qweight``/``scale`` names from them. Names follow the released MobileMoE checkpoints.

Roles:
    embedding    token embedding [V, H] (also the LM head when tied)
    lm_head      untied output projection [V, H]
    norm         RMSNorm weight [H]
    linear       a dense projection [out, in] (attention, shared expert, dense FFN)
    linear_bias  bias of an attention projection [out] (only with attention_bias)
    experts      stacked routed-expert weight [E, in, out]
    router       router weight [E, H] (kept fp32, never quantized)
    expert_bias  selection-only bias [E]
"""

from __future__ import annotations

from dataclasses import dataclass

from mobilemoe.config import MobileMoEConfig

QUANTIZED_ROLES = ("embedding", "lm_head", "linear", "experts")
MATMUL_ROLES = ("lm_head", "linear", "experts", "router")  # roles that cost 2 FLOPs/param/token


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    role: str
    layer: int | None = None
    # Fraction of this tensor each token touches: top-k / E for routed experts, 1 otherwise.
    active_fraction: float = 1.0

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def _attention(cfg: MobileMoEConfig, prefix: str, layer: int) -> list[TensorSpec]:
    q_out = cfg.num_attention_heads * cfg.head_dim
    kv_out = cfg.num_key_value_heads * cfg.head_dim
    shapes = {"q_proj": (q_out, cfg.hidden_size), "k_proj": (kv_out, cfg.hidden_size),
              "v_proj": (kv_out, cfg.hidden_size), "o_proj": (cfg.hidden_size, q_out)}
    specs = []
    for proj, shape in shapes.items():
        specs.append(TensorSpec(f"{prefix}.self_attn.{proj}.weight", shape, "linear", layer))
        if cfg.attention_bias:
            specs.append(TensorSpec(f"{prefix}.self_attn.{proj}.bias", (shape[0],), "linear_bias", layer))
    return specs


def _swiglu(prefix: str, hidden: int, width: int, layer: int) -> list[TensorSpec]:
    return [TensorSpec(f"{prefix}.gate_proj.weight", (width, hidden), "linear", layer),
            TensorSpec(f"{prefix}.up_proj.weight", (width, hidden), "linear", layer),
            TensorSpec(f"{prefix}.down_proj.weight", (hidden, width), "linear", layer)]


def _moe(cfg: MobileMoEConfig, prefix: str, layer: int) -> list[TensorSpec]:
    E, H, I = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
    frac = cfg.num_experts_per_tok / E
    specs = [TensorSpec(f"{prefix}.router.weight", (E, H), "router", layer),
             TensorSpec(f"{prefix}.expert_bias", (E,), "expert_bias", layer),
             TensorSpec(f"{prefix}.experts.gate_up_proj", (E, H, 2 * I), "experts", layer, frac),
             TensorSpec(f"{prefix}.experts.down_proj", (E, I, H), "experts", layer, frac)]
    if cfg.num_shared_experts:
        specs += _swiglu(f"{prefix}.shared_expert", H, cfg.intermediate_size_mlp, layer)
    return specs


def tensor_specs(cfg: MobileMoEConfig) -> list[TensorSpec]:
    """Every parameter tensor of the model, in a fixed order."""
    H = cfg.hidden_size
    specs = [TensorSpec("model.embed_tokens.weight", (cfg.vocab_size, H), "embedding")]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        specs.append(TensorSpec(f"{p}.input_layernorm.weight", (H,), "norm", i))
        specs += _attention(cfg, p, i)
        specs.append(TensorSpec(f"{p}.post_attention_layernorm.weight", (H,), "norm", i))
        if cfg.is_moe_layer(i):
            specs += _moe(cfg, f"{p}.feed_forward", i)
        else:
            specs += _swiglu(f"{p}.feed_forward", H, cfg.intermediate_size_mlp, i)
    specs.append(TensorSpec("model.norm.weight", (H,), "norm"))
    if not cfg.tie_word_embeddings:
        specs.append(TensorSpec("lm_head.weight", (cfg.vocab_size, H), "lm_head"))
    return specs


def spec_map(cfg: MobileMoEConfig) -> dict[str, TensorSpec]:
    return {s.name: s for s in tensor_specs(cfg)}
