"""Random-weight Q4_0 GGUF files shaped like a mobilemoe config, for timing llama.cpp.

MoE configs are written as llama.cpp's ``qwen2moe`` architecture (routed experts + one shared
expert; it needs an untied ``output.weight``), dense configs as ``llama`` (tied head). Weights are
random Q4_0 blocks (fp16 scale + 16 bytes of nibbles) written directly, which is what
``llama-quantize --pure Q4_0`` produces from random float weights, without a float copy in memory.
The vocabulary is llama.cpp's ``no_vocab`` kind with ``{arch}.vocab_size`` dummy tokens: timing only.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mobilemoe.config import MobileMoEConfig
from mobilemoe.errors import MobileMoEError
from mobilemoe.export.gguf import Q4_0_BLOCK, Q4_0_BYTES

SCALE = 0.004  # codes uniform in [-8, 7] -> weights of std ~0.018


def _gguf():
    try:
        import gguf
    except ImportError:
        raise MobileMoEError("the `gguf` package is not installed: install it: pip install gguf==0.19.0 (make setup does)") from None
    return gguf


def _q4_0(rng: np.random.Generator, *shape: int) -> np.ndarray:
    """Random Q4_0 bytes for a float tensor of numpy shape ``shape`` (last dim quantized)."""
    *lead, n = shape
    blocks = rng.integers(0, 256, size=(*lead, n // Q4_0_BLOCK, Q4_0_BYTES), dtype=np.uint8)
    blocks[..., :2] = np.frombuffer(np.float16(SCALE).tobytes(), dtype=np.uint8)
    return blocks.reshape(*lead, n // Q4_0_BLOCK * Q4_0_BYTES)


def _check(cfg: MobileMoEConfig, arch: str) -> None:
    if cfg.num_attention_heads * cfg.head_dim != cfg.hidden_size:
        raise MobileMoEError(f"llama.cpp's {arch} needs heads x head_dim == hidden_size, got "
                             f"{cfg.num_attention_heads} x {cfg.head_dim} != {cfg.hidden_size}")
    if arch == "qwen2moe" and (not cfg.is_moe or cfg.interleave_moe_layer_step != 1):
        raise MobileMoEError("qwen2moe needs an MoE config with every layer MoE")


def write_random_gguf(cfg: MobileMoEConfig, path: str | os.PathLike, seed: int = 0) -> Path:
    """Write ``path`` (qwen2moe for MoE configs, llama for dense) and return it."""
    gguf = _gguf()
    arch = "qwen2moe" if cfg.is_moe else "llama"
    _check(cfg, arch)
    rng = np.random.default_rng(seed)
    H, V, L = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * cfg.head_dim
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")  # written beside the target, then renamed into place
    w = gguf.GGUFWriter(str(tmp), arch)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(H)
    w.add_block_count(L)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(V)
    w.add_tokenizer_model("no_vocab")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    q4, f32 = gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.F32

    def add_q4(name: str, *shape: int) -> None:
        w.add_tensor(name, _q4_0(rng, *shape), raw_dtype=q4)

    def add_f32(name: str, array: np.ndarray) -> None:
        w.add_tensor(name, array.astype(np.float32), raw_dtype=f32)

    add_q4("token_embd.weight", V, H)
    add_f32("output_norm.weight", np.ones(H))
    if arch == "qwen2moe":
        add_q4("output.weight", V, H)
        w.add_expert_count(cfg.num_local_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_feed_forward_length(cfg.intermediate_size)
        w.add_expert_shared_feed_forward_length(cfg.intermediate_size_mlp)
        w.add_feed_forward_length(cfg.intermediate_size)
    else:
        w.add_feed_forward_length(cfg.intermediate_size_mlp)
    E, I, S = cfg.num_local_experts, cfg.intermediate_size, cfg.intermediate_size_mlp
    for i in range(L):
        b = f"blk.{i}"
        add_f32(f"{b}.attn_norm.weight", np.ones(H))
        add_q4(f"{b}.attn_q.weight", H, H)
        add_q4(f"{b}.attn_k.weight", kv, H)
        add_q4(f"{b}.attn_v.weight", kv, H)
        add_q4(f"{b}.attn_output.weight", H, H)
        add_f32(f"{b}.ffn_norm.weight", np.ones(H))
        if arch == "qwen2moe":
            add_f32(f"{b}.ffn_gate_inp.weight", rng.normal(0, 0.02, (E, H)))
            add_q4(f"{b}.ffn_gate_exps.weight", E, I, H)
            add_q4(f"{b}.ffn_up_exps.weight", E, I, H)
            add_q4(f"{b}.ffn_down_exps.weight", E, H, I)
            add_f32(f"{b}.ffn_gate_inp_shexp.weight", rng.normal(0, 0.02, (H,)))
            add_q4(f"{b}.ffn_gate_shexp.weight", S, H)
            add_q4(f"{b}.ffn_up_shexp.weight", S, H)
            add_q4(f"{b}.ffn_down_shexp.weight", H, S)
        else:
            add_q4(f"{b}.ffn_gate.weight", S, H)
            add_q4(f"{b}.ffn_up.weight", S, H)
            add_q4(f"{b}.ffn_down.weight", H, S)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, path)
    return path
