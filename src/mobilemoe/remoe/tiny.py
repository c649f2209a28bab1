"""Tiny random transformers MoE models built offline from configs (tests and demos; no hub access)."""

from __future__ import annotations

from pathlib import Path

import torch

COMMON = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def tiny_config(family: str):
    import transformers as tf

    if family == "mixtral":
        return tf.MixtralConfig(**COMMON, num_local_experts=8, num_experts_per_tok=2)
    if family == "qwen2_moe":
        return tf.Qwen2MoeConfig(**COMMON, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                                 shared_expert_intermediate_size=32, decoder_sparse_step=1)
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(**COMMON, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                                 decoder_sparse_step=1, head_dim=8)
    if family == "olmoe":
        return tf.OlmoeConfig(**COMMON, num_experts=8, num_experts_per_tok=2)
    if family == "deepseek_v3":
        return tf.DeepseekV3Config(**{**COMMON, "num_key_value_heads": 4}, n_routed_experts=8,
                                   num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                                   n_group=2, topk_group=1, first_k_dense_replace=0, kv_lora_rank=16,
                                   q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)
    if family == "granitemoe":
        return tf.GraniteMoeConfig(**COMMON, num_local_experts=8, num_experts_per_tok=2)
    raise ValueError(f"no tiny config for {family!r}")


def build_tiny(family: str, out_dir: str | Path | None = None, seed: int = 0):
    """A randomly initialised tiny model of ``family``; saved with save_pretrained when out_dir is given."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32)
    with torch.no_grad():  # some families init routers / correction biases to zero: make routing non-trivial
        for name, p in model.named_parameters():
            if name.endswith("gate.weight") or name.endswith("router.weight"):
                p.normal_(0, 0.5)
    model.eval()
    if out_dir is not None:
        model.save_pretrained(Path(out_dir))
    return model
