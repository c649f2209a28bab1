"""Parameter, FLOP and byte accounting: the single source for these numbers.

Everything is derived from :func:`mobilemoe.layout.tensor_specs`, so the counts match the model's
``parameters()`` exactly (a test checks it) and the INT4 byte count matches the packed checkpoint.

Conventions (stated so numbers are comparable with the papers):
* *active params per token*: every tensor a token touches, routed experts scaled by top-k / E.
  A tied embedding counts once (it is also the LM head), as in the MobileMoE paper's 272M for S.
* *FLOPs per token*: 2 x the matmul parameters a token uses (attention projections, router, routed
  and shared experts, LM head; not the embedding lookup or norms) plus attention itself,
  4 x heads x head_dim x context per layer (QK^T and AV).
* *INT4 weight bytes*: ``mobilemoe-int4-g32``: quantized tensors (embedding, linears, experts) at
  half a byte per value plus one fp16 scale per 32 values; router fp32; norms and expert_bias bf16.
  The same for either routed-expert group axis (``expert_quant_group_axis``: the groups move, their
  count does not).
* *Weight bytes read per decoded token*: what a memory-bound decoder streams: every dense tensor,
  top-k of the routed experts, the full LM head, and one embedding row.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from mobilemoe.config import MobileMoEConfig
from mobilemoe.formats import int4_nbytes, packed_expert_nbytes
from mobilemoe.layout import MATMUL_ROLES, QUANTIZED_ROLES, TensorSpec, tensor_specs

BYTES_PER_DTYPE = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}
int4_bytes = int4_nbytes  # packed INT4 codes (2 per byte) plus one fp16 scale per group


def tensor_bytes(spec: TensorSpec, fmt: str = "int4") -> int:
    """Bytes one tensor takes in a checkpoint of format ``int4`` (the INT4 contract) or a dtype name."""
    if fmt == "int4":
        if spec.role in QUANTIZED_ROLES:
            return int4_nbytes(spec.numel)
        return spec.numel * (4 if spec.role == "router" else 2)
    dtype_bytes = BYTES_PER_DTYPE[fmt]
    return spec.numel * (4 if spec.role == "router" else dtype_bytes)


def total_params(cfg: MobileMoEConfig) -> int:
    return sum(s.numel for s in tensor_specs(cfg))


def active_params(cfg: MobileMoEConfig) -> float:
    return sum(s.numel * s.active_fraction for s in tensor_specs(cfg))


def weight_bytes(cfg: MobileMoEConfig, fmt: str = "int4") -> int:
    return sum(tensor_bytes(s, fmt) for s in tensor_specs(cfg))


def matmul_params_per_token(cfg: MobileMoEConfig) -> float:
    specs = tensor_specs(cfg)
    n = sum(s.numel * s.active_fraction for s in specs if s.role in MATMUL_ROLES)
    if cfg.tie_word_embeddings:  # the embedding doubles as the LM head matmul
        n += sum(s.numel for s in specs if s.role == "embedding")
    return n


def attention_flops(cfg: MobileMoEConfig, context: int) -> float:
    """FLOPs of QK^T and AV for one query attending to ``context`` keys, summed over layers."""
    return 4.0 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * context


def decode_flops_per_token(cfg: MobileMoEConfig, context: int) -> float:
    """FLOPs to decode one token whose KV cache holds ``context`` positions (itself included)."""
    return 2.0 * matmul_params_per_token(cfg) + attention_flops(cfg, context)


def prefill_flops(cfg: MobileMoEConfig, prompt_len: int) -> float:
    """FLOPs for a causal prefill of ``prompt_len`` tokens (token t attends to t+1 positions)."""
    mean_context = (prompt_len + 1) / 2
    return prompt_len * (2.0 * matmul_params_per_token(cfg) + attention_flops(cfg, mean_context))


def decode_weight_bytes_per_token(cfg: MobileMoEConfig, fmt: str = "int4") -> float:
    """Weight bytes a memory-bound decoder reads per token (see module docstring)."""
    total = 0.0
    for s in tensor_specs(cfg):
        nbytes = tensor_bytes(s, fmt)
        if s.role == "embedding":
            total += nbytes / cfg.vocab_size  # one row for the lookup
            if cfg.tie_word_embeddings:
                total += nbytes  # the whole matrix again as the LM head
        else:
            total += nbytes * s.active_fraction
    return total


def _one_layer_expert_specs(cfg: MobileMoEConfig) -> list[TensorSpec]:
    """The stacked routed-expert tensors of the first MoE layer (every MoE layer is alike)."""
    specs = [s for s in tensor_specs(cfg) if s.role == "experts"]
    return [s for s in specs if s.layer == specs[0].layer] if specs else []


def routed_expert_bytes(cfg: MobileMoEConfig, fmt: str = "int4") -> int:
    """Bytes of ONE routed expert (its gate_up and down slices, with INT4 scales) in format ``fmt``."""
    specs = _one_layer_expert_specs(cfg)
    return sum(tensor_bytes(s, fmt) for s in specs) // cfg.num_local_experts if specs else 0


def runtime_expert_bytes(cfg: MobileMoEConfig) -> int:
    """Bytes of ONE routed expert as the native runtime holds and offloads it
    (:func:`mobilemoe.kernels.pack.pack_experts`): its gate_up and down matrices [in, out] in the
    runtime layout (:func:`mobilemoe.formats.packed_expert_nbytes`)."""
    return sum(packed_expert_nbytes(*s.shape[1:]) for s in _one_layer_expert_specs(cfg))


def kv_cache_bytes(cfg: MobileMoEConfig, context: int, dtype_bytes: int = 2) -> int:
    """K and V for every layer at ``context`` positions (batch 1)."""
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * context * dtype_bytes


@dataclass
class Accounting:
    total_params: int
    active_params: int
    embedding_params: int
    expert_params: int
    moe_layers: int
    dense_layers: int
    bf16_bytes: int
    int4_bytes: int
    int4_decode_bytes_per_token: int
    decode_flops_per_token_256: float
    decode_flops_per_token_2048: float
    prefill_flops_per_token_1024: float
    kv_cache_bytes_8192: int

    def to_dict(self) -> dict:
        return asdict(self)


def account(cfg: MobileMoEConfig) -> Accounting:
    """All headline numbers of a config in one record (what ``mobilemoe info`` prints)."""
    specs = tensor_specs(cfg)
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    return Accounting(
        total_params=total_params(cfg),
        active_params=round(active_params(cfg)),
        embedding_params=sum(s.numel for s in specs if s.role in ("embedding", "lm_head")),
        expert_params=sum(s.numel for s in specs if s.role == "experts"),
        moe_layers=moe_layers,
        dense_layers=cfg.num_hidden_layers - moe_layers,
        bf16_bytes=weight_bytes(cfg, "bfloat16"),
        int4_bytes=weight_bytes(cfg, "int4"),
        int4_decode_bytes_per_token=round(decode_weight_bytes_per_token(cfg, "int4")),
        decode_flops_per_token_256=decode_flops_per_token(cfg, 256),
        decode_flops_per_token_2048=decode_flops_per_token(cfg, 2048),
        prefill_flops_per_token_1024=prefill_flops(cfg, 1024) / 1024,
        kv_cache_bytes_8192=kv_cache_bytes(cfg, 8192),
    )
