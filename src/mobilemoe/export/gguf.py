"""MobileMoE -> GGUF for llama.cpp, and the GGUF router patcher.

Architecture: llama.cpp's ``exaone-moe`` (``src/models/exaone-moe.cpp``)
=======================================================================

Among the llama.cpp MoE architectures with a sigmoid router and a selection bias
(``exp_probs_b``), ``exaone-moe`` is the one whose graph matches MobileMoE exactly, feature by
feature:

* MoE block: ``build_moe_ffn`` with ``{arch}.expert_gating_func`` = SIGMOID (2), the selection-only
  bias ``blk.N.exp_probs_b.bias`` (added to the sigmoid scores for the top-k choice only; the
  combine weights are the unbiased scores), ``expert_weights_norm`` (= ``norm_topk_prob``) and
  ``expert_weights_scale`` (= ``routed_scaling_factor``), SwiGLU experts, then ``+`` an ungated
  shared SwiGLU expert whose width is its own key (``expert_shared_feed_forward_length``, so
  ``intermediate_size_mlp`` need not be a multiple of the routed width as in ``dots1``).
* Attention: GQA, no biases, scale 1/sqrt(head_dim), QK-norm = RMS norm per head with eps
  ``rms_norm_eps`` (we write all-ones weights: ours is weightless), applied before RoPE (equivalent,
  RoPE preserves each head's norm).
* RoPE: ``exaone-moe`` is a NEOX (split-half) architecture, ours rotates adjacent pairs. Permuting
  the rows of Q and K inside every head from ``[0, 2, 4, ..., 1, 3, 5, ...]`` order turns adjacent
  pairs into split halves with the same frequencies; q.k and the per-head RMS norm are invariant under
  the same permutation of both, so this is exact (and keeps INT4 groups intact, since groups run
  along the input axis). llama3 frequency scaling is carried by the ``rope_freqs.weight`` factors,
  which ``exaone-moe`` loads (``get_rope_factors``) -- unlike ``dots1``, ``glm4moe``, ``bailingmoe2``
  or ``hy-v3``, which rotate with unscaled frequencies only.
* Per-layer NoPE (``no_rope_layers`` entries 0): ``exaone-moe`` applies RoPE only on its
  "sliding-window" layers. We mark exactly the RoPE layers as SWA and set the window to
  ``max_position_embeddings`` (no position is ever further away than that, so nothing is masked):
  every layer is full causal attention, with RoPE exactly where MobileMoE uses it.
* Tied embeddings: ``exaone-moe`` requires ``output.weight`` (its fallback to ``token_embd`` is
  unreachable in this llama.cpp), so tied checkpoints write a copy of the embedding (same values, same
  Q4_0 blocks; it costs the embedding's bytes once more). Leading dense layers:
  ``leading_dense_block_count``.

Also carried: ``router_type`` softmax (gating func SOFTMAX, the bias still only steers selection),
``norm_topk_prob`` false, untied LM heads (``output.weight``).

Not representable (``ExportError`` names the feature): dense layers interleaved between MoE layers
(``interleave_moe_layer_step`` > 1 puts a dense layer after an MoE layer), no shared expert
(``num_shared_experts=0``), attention biases, ``use_qk_norm`` false (the QK-norm is always applied),
dense models (no MoE layer).

Verified (tests/export): with ``--type f32`` and llama.cpp's KV cache in f32 with flash attention off,
llama.cpp's logits equal mobilemoe's to ~1e-6 (llama3 rope factors, NoPE layers, a leading dense
layer, softmax / un-normalised routers, untied heads). llama.cpp's defaults (f16 KV cache, CPU flash
attention rounding Q to f16) or f16 weights add ~5e-4, and can flip a near-tie top-k choice.

Candidates rejected: ``deepseek2`` (MLA attention), ``dots1`` / ``glm4moe`` / ``bailingmoe2`` /
``afmoe`` / ``hy-v3`` (no rope factors: llama3 scaling not representable; dots1 also ties the shared
width to the routed one), ``llama4`` (top-1 sigmoid weighting before the expert, no selection bias),
``qwen2moe``/``qwen3moe`` (softmax routers, gated shared expert).

Quantization types (``--type``): ``int4`` (the default for INT4 checkpoints), ``f32`` (bit-exact
weights, for verification), ``f16`` (the default for float checkpoints; norms, routers, biases, rope
factors are always f32), ``q8_0`` and ``q4_0``. From an INT4 (``mobilemoe-int4-g32``) checkpoint, Q4_0
of the attention, shared-expert, dense-FFN and embedding matrices is *exact*: our codes are Q4_0's
``q - 8`` with the same signed fp16 scale per 32 inputs; only the nibble order inside a block differs
(Q4_0 keeps element j in the low nibble of byte j and element j+16 in the high nibble) and is
reordered here. The routed experts depend on the checkpoint's ``quantization.expert_group_axis``
(config field ``expert_quant_group_axis``):

* ``out`` (the released format, the default): grouped along their *output* axis, but GGUF blocks run
  along the input axis, so no 4-bit GGUF block holds them exactly: ``q4_0`` re-quantizes them
  (3.8-7.7% RMS weight error on tiny models, 8.2-8.4% on the released mobilemoe-s layout; llama.cpp's
  logits then differ from the INT4 forward by ~1e-1 on a tiny model), ``int4`` writes them as Q8_0 of
  their exactly decoded values (0.4-0.5% RMS, below the Q8_0 rounding llama.cpp applies to every
  activation anyway) and keeps everything else code-exact Q4_0: ~1.7x the checkpoint, as close to the
  INT4 forward as the native runtime (measured numbers: ``src/mobilemoe/export/README.md``).
* ``in`` (models trained/quantized here with ``expert_quant_group_axis: "in"``): each expert is stored
  [E, out, in] with groups along ``in``, which is exactly GGUF's ``ffn_{gate,up,down}_exps`` layout
  and Q4_0's blocks, so ``int4`` and ``q4_0`` (identical files then) copy the routed experts code for
  code too: the whole model is exact Q4_0 at 1.0x the checkpoint (``report.exact_q4_0`` counts
  every matmul weight, ``report.requantized`` is empty) and llama.cpp's logits equal the INT4 forward
  to float rounding (tests/export/test_export_gguf_expert_axis.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from typing import Callable
from pathlib import Path

import numpy as np
import torch

from mobilemoe.config import MobileMoEConfig
from mobilemoe.errors import MobileMoEError
from mobilemoe.export.common import ExportError, unsupported
from mobilemoe.formats import GROUP_SIZE, SCALE_DTYPE, unpack_int4
from mobilemoe.quant.int4 import dequantize

ARCH = "exaone-moe"
TYPES = ("int4", "f32", "f16", "q8_0", "q4_0")
TARGET = f"GGUF (llama.cpp '{ARCH}')"
# ggml's block_q4_0: one fp16 scale, then 32 values as 16 bytes of nibbles (q = code + 8). Its block
# equals our INT4 group, which is why linear-layout tensors copy into Q4_0 code for code.
Q4_0_BLOCK = GROUP_SIZE
Q4_0_BYTES = SCALE_DTYPE.itemsize + Q4_0_BLOCK // 2


def _gguf():
    try:
        import gguf
    except ImportError:
        raise MobileMoEError("the `gguf` package is not installed: pip install gguf") from None
    return gguf


# ---------------------------------------------------------------------- representability
def leading_dense_layers(cfg: MobileMoEConfig) -> int:
    n = 0
    while n < cfg.num_hidden_layers and not cfg.is_moe_layer(n):
        n += 1
    return n


def check_gguf(cfg: MobileMoEConfig) -> None:
    """Raise :class:`ExportError` naming the first feature ``exaone-moe`` cannot represent."""
    if not cfg.is_moe:
        raise unsupported(TARGET, "a dense model (num_local_experts=0)",
                          "the exaone-moe graph needs MoE layers; export dense models to HF instead")
    lead = leading_dense_layers(cfg)
    if any(not cfg.is_moe_layer(i) for i in range(lead, cfg.num_hidden_layers)):
        raise unsupported(TARGET, f"interleaved dense layers (interleave_moe_layer_step="
                          f"{cfg.interleave_moe_layer_step})",
                          "llama.cpp supports dense layers only before the first MoE layer "
                          "(leading_dense_block_count)")
    if cfg.num_shared_experts != 1:
        raise unsupported(TARGET, f"num_shared_experts={cfg.num_shared_experts}",
                          "exaone-moe always adds exactly one shared expert")
    if cfg.attention_bias:
        raise unsupported(TARGET, "attention_bias=true", "exaone-moe attention has no biases")
    if not cfg.use_qk_norm:
        raise unsupported(TARGET, "use_qk_norm=false", "exaone-moe always applies the QK-norm")
    if cfg.router_type not in ("sigmoid", "softmax"):
        raise unsupported(TARGET, f"router_type={cfg.router_type!r}")


# ---------------------------------------------------------------------- tensors
def neox_permutation(head_dim: int) -> torch.Tensor:
    """Row order inside a head mapping adjacent-pair RoPE to split-half (NEOX) RoPE."""
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


def _permute_heads(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Permute the rows (dim 0) of a [n_heads*head_dim, ...] tensor inside each head."""
    perm = neox_permutation(head_dim)
    return w.reshape(n_heads, head_dim, *w.shape[1:])[:, perm].reshape(w.shape)


def q4_0_from_int4(codes: torch.Tensor, scales: torch.Tensor) -> np.ndarray:
    """Our codes [..., n] (int8 in [-8, 7]) and fp16 scales [..., n/32] -> Q4_0 block bytes
    [..., n/32*18]: per block the fp16 scale, then byte j = (q[j]) | (q[j+16] << 4), q = code + 8."""
    *lead, n = codes.shape
    nb, half = n // Q4_0_BLOCK, Q4_0_BLOCK // 2
    q = (codes.to(torch.int16) + 8).to(torch.uint8).reshape(*lead, nb, Q4_0_BLOCK)
    qs = q[..., :half] | (q[..., half:] << 4)
    d = scales.to(SCALE_DTYPE).contiguous().view(torch.uint8).reshape(*lead, nb, SCALE_DTYPE.itemsize)
    return torch.cat([d, qs], dim=-1).reshape(*lead, nb * Q4_0_BYTES).numpy()


def int4_from_q4_0(blocks: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`q4_0_from_int4`: Q4_0 bytes [..., nb*18] -> (codes int8 [..., nb*32], fp16 scales)."""
    *lead, nbytes = blocks.shape
    nb, sb = nbytes // Q4_0_BYTES, SCALE_DTYPE.itemsize
    b = torch.from_numpy(np.array(blocks, dtype=np.uint8, copy=True)).reshape(*lead, nb, Q4_0_BYTES)
    scales = b[..., :sb].contiguous().view(SCALE_DTYPE).squeeze(-1)
    qs = b[..., sb:]
    q = torch.cat([qs & 0xF, qs >> 4], dim=-1).to(torch.int8) - 8
    return q.reshape(*lead, nb * Q4_0_BLOCK), scales


@dataclass
class _Source:
    """A logical tensor: float values, or (from an INT4 checkpoint) its packed codes + scales, stored
    with the grouped dim ``group_dim`` (:func:`mobilemoe.checkpoint.quantized_group_dim`) last."""
    value: torch.Tensor | None = None
    qweight: torch.Tensor | None = None
    scales: torch.Tensor | None = None
    group_dim: int = -1

    def float(self) -> torch.Tensor:
        if self.value is not None:
            return self.value.float()
        return dequantize(self.qweight, self.scales, group_dim=self.group_dim)


def _read(ckpt: str | os.PathLike) -> tuple[MobileMoEConfig, dict[str, _Source]]:
    from mobilemoe.checkpoint import load_tensors, quantized_group_dim, quantized_names
    from mobilemoe.layout import QUANTIZED_ROLES, tensor_specs

    cfg, tensors = load_tensors(ckpt)
    out: dict[str, _Source] = {}
    for spec in tensor_specs(cfg):
        if cfg.is_quantized and spec.role in QUANTIZED_ROLES:
            qn, sn = quantized_names(spec)
            out[spec.name] = _Source(qweight=tensors[qn], scales=tensors[sn], group_dim=quantized_group_dim(cfg, spec))
        else:
            out[spec.name] = _Source(value=tensors[spec.name])
    return cfg, out


@dataclass
class GGUFExportReport:
    out: str
    arch: str
    type: str
    tensors: int = 0
    bytes: int = 0
    exact_q4_0: list[str] = field(default_factory=list)  # tensors copied code-for-code
    requantized: list[str] = field(default_factory=list)  # tensors quantized from float values
    tokenizer: str = "no_vocab"

    def to_dict(self) -> dict:
        return {"out": self.out, "arch": self.arch, "type": self.type, "tensors": self.tensors,
                "bytes": self.bytes, "exact_q4_0": len(self.exact_q4_0),
                "requantized": len(self.requantized), "tokenizer": self.tokenizer}


# ---------------------------------------------------------------------- tokenizer
def _tokenizer_fields(path: Path, cfg: MobileMoEConfig) -> dict | None:
    """gpt2-style vocab + merges from a byte-level BPE tokenizer.json (None if there is none)."""
    tj = path / "tokenizer.json"
    if not tj.exists():
        return None
    data = json.loads(tj.read_text(encoding="utf-8"))
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise unsupported(TARGET, f"a {model.get('type')!r} tokenizer.json", "only byte-level BPE exports")
    vocab: dict[str, int] = dict(model["vocab"])
    special: set[int] = set()
    for tok in data.get("added_tokens", []):
        vocab[tok["content"]] = tok["id"]
        if tok.get("special", False):
            special.add(tok["id"])
    n = max(cfg.vocab_size, max(vocab.values()) + 1)
    if n > cfg.vocab_size:
        raise ExportError(f"{tj}: tokenizer has ids up to {n - 1}, beyond vocab_size {cfg.vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [5] * n  # UNUSED
    for tok, i in vocab.items():
        tokens[i] = tok
        types[i] = 3 if i in special else 1  # CONTROL / NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    pre = json.dumps(data.get("pre_tokenizer"))
    pre_name = "llama-bpe" if "(?i:'s|'t|'re|'ve|'m|'ll|'d)" in pre else "gpt-2"

    def find(*names: str) -> int | None:
        for name in names:
            if name in vocab:
                return vocab[name]
        return None

    eos = cfg.eos_token_id[0] if isinstance(cfg.eos_token_id, list) else cfg.eos_token_id
    return {"tokens": tokens, "types": types, "merges": merges, "pre": pre_name,
            "bos": cfg.bos_token_id if cfg.bos_token_id is not None else find("<|bos|>", "<|begin_of_text|>"),
            "eos": eos if eos is not None else find("<|eos|>", "<|end_of_text|>", "<|endoftext|>")}


# ---------------------------------------------------------------------- export
def default_type(cfg: MobileMoEConfig) -> str:
    """``int4`` for INT4 checkpoints (as faithful as the native runtime at <2x the size for experts
    grouped along ``out``; all exact Q4_0 at 1.0x for ``in``), else ``f16``."""
    return "int4" if cfg.is_quantized else "f16"


def export_gguf(ckpt: str | os.PathLike, out: str | os.PathLike, type: str | None = None,
                only: Callable[[str], bool] | None = None) -> GGUFExportReport:
    """Write ``out`` (a GGUF for llama.cpp's ``exaone-moe``) from a mobilemoe checkpoint directory.
    ``type``: one of :data:`TYPES`; None picks :func:`default_type`. Exact Q4_0 copies (see the module
    docstring): with ``int4`` / ``q4_0``, every matrix grouped along ``in`` -- all of them when the
    checkpoint's routed experts are grouped along ``in``; otherwise the experts are Q8_0 (``int4``)
    or re-quantized Q4_0 (``q4_0``, 3.8-8.4% RMS weight error).

    ``only`` (a diagnostic): the matmul weights whose GGUF name it rejects are written f32, so
    llama.cpp's arithmetic on one kind of tensor can be checked alone."""
    gguf = _gguf()
    if type is not None and type not in TYPES:
        raise ExportError(f"unknown GGUF type {type!r}: choose one of {TYPES}")
    ckpt = Path(ckpt)
    cfg, src = _read(ckpt)
    check_gguf(cfg)
    type = type or default_type(cfg)
    if type == "int4" and not cfg.is_quantized:
        raise ExportError(f"{ckpt}: --type int4 needs an INT4 checkpoint (mobilemoe-int4-g32), this one is "
                          "float: use f16, q8_0 or q4_0")
    tok = _tokenizer_fields(ckpt, cfg)
    H, D, L = cfg.hidden_size, cfg.head_dim, cfg.num_hidden_layers
    qt = gguf.GGMLQuantizationType
    # int4: weights whose INT4 groups run along `in` copy into Q4_0 code for code (add_weight, and
    # add_experts for experts grouped along `in`); experts grouped along `out` are written as Q8_0 of
    # their exact values.
    wtype = {"f32": qt.F32, "f16": qt.F16, "q8_0": qt.Q8_0, "q4_0": qt.Q4_0, "int4": qt.Q8_0}[type]
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
             "int4": gguf.LlamaFileType.MOSTLY_Q4_0}[type]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    report = GGUFExportReport(out=str(out), arch=ARCH, type=type)
    w = gguf.GGUFWriter(str(tmp), ARCH)
    w.add_name(ckpt.name)
    w.add_file_type(ftype)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(H)
    w.add_block_count(L)
    w.add_feed_forward_length(cfg.intermediate_size_mlp)  # leading dense layers
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(D)
    w.add_value_length(D)
    w.add_rope_dimension_count(D)
    w.add_rope_freq_base(float(cfg.rope_theta))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_expert_count(cfg.num_local_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_expert_feed_forward_length(cfg.intermediate_size)
    w.add_expert_shared_feed_forward_length(cfg.intermediate_size_mlp)
    w.add_expert_shared_count(1)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if cfg.router_type == "sigmoid"
                             else gguf.ExpertGatingFuncType.SOFTMAX)
    w.add_expert_weights_norm(bool(cfg.norm_topk_prob))
    w.add_expert_weights_scale(float(cfg.routed_scaling_factor))
    w.add_leading_dense_block_count(leading_dense_layers(cfg))
    # RoPE layers are the "SWA" layers of exaone-moe; a window of the whole context masks nothing.
    w.add_sliding_window(cfg.max_position_embeddings)
    w.add_sliding_window_pattern([bool(cfg.uses_rope(i)) for i in range(L)])
    if tok is None:
        w.add_tokenizer_model("no_vocab")
        w.add_vocab_size(cfg.vocab_size)
        eos = cfg.eos_token_id[0] if isinstance(cfg.eos_token_id, list) else cfg.eos_token_id
        if eos is not None:  # so `generate --model X.gguf` stops where the checkpoint does
            w.add_eos_token_id(int(eos))
    else:
        report.tokenizer = "gpt2"
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(tok["pre"])
        w.add_token_list(tok["tokens"])
        w.add_token_types(tok["types"])
        w.add_token_merges(tok["merges"])
        if tok["bos"] is not None:
            w.add_bos_token_id(int(tok["bos"]))
        if tok["eos"] is not None:
            w.add_eos_token_id(int(tok["eos"]))
        w.add_add_bos_token(False)
        w.add_add_eos_token(False)

    def add_f32(name: str, t: torch.Tensor) -> None:
        arr = t.float().contiguous().numpy()
        w.add_tensor(name, arr, raw_dtype=qt.F32)
        report.tensors += 1
        report.bytes += arr.nbytes

    def add_weight(name: str, s: _Source, rows_perm=None) -> None:
        """A matmul weight [out, in] (or [E, out, in]) in the chosen type."""
        if only is not None and not only(name):
            _add_float(name, s.float() if rows_perm is None else rows_perm(s.float()), qt.F32)
        elif s.qweight is not None and type in ("q4_0", "int4"):
            qweight, scales = s.qweight, s.scales
            if rows_perm is not None:  # a row permutation moves packed rows and their scales alike
                qweight, scales = rows_perm(qweight), rows_perm(scales)
            arr = q4_0_from_int4(unpack_int4(qweight), scales)
            w.add_tensor(name, arr, raw_dtype=qt.Q4_0)
            report.exact_q4_0.append(name)
            report.bytes += arr.nbytes
        else:
            t = s.float()
            if rows_perm is not None:
                t = rows_perm(t)
            _add_float(name, t)
        report.tensors += 1

    def _add_float(name: str, t: torch.Tensor, as_type=None) -> None:
        arr = t.float().contiguous().numpy()
        as_type = wtype if as_type is None else as_type
        if as_type == qt.F32:
            w.add_tensor(name, arr, raw_dtype=qt.F32)
        elif as_type == qt.F16:
            arr = arr.astype(np.float16)
            w.add_tensor(name, arr, raw_dtype=qt.F16)
        else:
            arr = gguf.quants.quantize(arr, as_type)
            w.add_tensor(name, arr, raw_dtype=as_type)
            report.requantized.append(name)
        report.bytes += arr.nbytes

    def add_experts(name: str, t: torch.Tensor) -> None:
        _add_float(name, t, qt.F32 if only is not None and not only(name) else None)
        report.tensors += 1

    def add_expert_pair(names: tuple[str, ...], s: _Source) -> None:
        """A stacked expert tensor [E, in, out] -> GGUF [E, out, in] (gate_up: split into gate and up
        along out). Experts grouped along `in` are stored [E, out, in], GGUF's own layout: their packed
        rows go through add_weight (Q4_0 code for code for int4/q4_0, like every linear weight)."""
        if s.qweight is not None and s.group_dim == -2:
            rows = s.qweight.shape[1] // len(names)
            for k, name in enumerate(names):
                part = slice(k * rows, (k + 1) * rows)
                add_weight(name, _Source(qweight=s.qweight[:, part], scales=s.scales[:, part]))
            return
        t = s.float().transpose(1, 2)  # [E, out, in], y = x @ W
        rows = t.shape[1] // len(names)
        for k, name in enumerate(names):
            add_experts(name, t[:, k * rows:(k + 1) * rows])

    add_weight("token_embd.weight", src["model.embed_tokens.weight"])
    add_f32("output_norm.weight", src["model.norm.weight"].float())
    # exaone-moe requires output.weight (its tied fallback is unreachable): tied checkpoints write a
    # copy of the embedding, identical values (and identical Q4_0 blocks).
    add_weight("output.weight", src["model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"])
    if cfg.rope_scaling is not None and any(cfg.no_rope_layers):
        from mobilemoe.model import rope_inv_freq

        base = cfg.rope_theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
        add_f32("rope_freqs.weight", (base / rope_inv_freq(cfg).double()).float())
    nH, nKV = cfg.num_attention_heads, cfg.num_key_value_heads
    ones = torch.ones(D)
    for i in range(L):
        p, b = f"model.layers.{i}", f"blk.{i}"
        add_f32(f"{b}.attn_norm.weight", src[f"{p}.input_layernorm.weight"].float())
        add_weight(f"{b}.attn_q.weight", src[f"{p}.self_attn.q_proj.weight"],
                   lambda t: _permute_heads(t, nH, D))
        add_weight(f"{b}.attn_k.weight", src[f"{p}.self_attn.k_proj.weight"],
                   lambda t: _permute_heads(t, nKV, D))
        add_weight(f"{b}.attn_v.weight", src[f"{p}.self_attn.v_proj.weight"])
        add_weight(f"{b}.attn_output.weight", src[f"{p}.self_attn.o_proj.weight"])
        add_f32(f"{b}.attn_q_norm.weight", ones)
        add_f32(f"{b}.attn_k_norm.weight", ones)
        add_f32(f"{b}.ffn_norm.weight", src[f"{p}.post_attention_layernorm.weight"].float())
        f = f"{p}.feed_forward"
        if not cfg.is_moe_layer(i):
            add_weight(f"{b}.ffn_gate.weight", src[f"{f}.gate_proj.weight"])
            add_weight(f"{b}.ffn_up.weight", src[f"{f}.up_proj.weight"])
            add_weight(f"{b}.ffn_down.weight", src[f"{f}.down_proj.weight"])
            continue
        add_f32(f"{b}.ffn_gate_inp.weight", src[f"{f}.router.weight"].float())
        add_f32(f"{b}.exp_probs_b.bias", src[f"{f}.expert_bias"].float())
        # gate_up [E, H, 2I] (gate = the first I outputs) -> gate, up [E, I, H]; down [E, I, H] -> [E, H, I]
        add_expert_pair((f"{b}.ffn_gate_exps.weight", f"{b}.ffn_up_exps.weight"), src[f"{f}.experts.gate_up_proj"])
        add_expert_pair((f"{b}.ffn_down_exps.weight",), src[f"{f}.experts.down_proj"])
        add_weight(f"{b}.ffn_gate_shexp.weight", src[f"{f}.shared_expert.gate_proj.weight"])
        add_weight(f"{b}.ffn_up_shexp.weight", src[f"{f}.shared_expert.up_proj.weight"])
        add_weight(f"{b}.ffn_down_shexp.weight", src[f"{f}.shared_expert.down_proj.weight"])
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()
    os.replace(tmp, out)
    return report


# ---------------------------------------------------------------------- router patching
_ROUTER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:feed_forward|mlp|block_sparse_moe)\.(router|gate)\.weight$")
_BIAS_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:feed_forward|mlp)\.expert_bias$")


def _gguf_name(name: str) -> str | None:
    if name.startswith("blk.") and (name.endswith(".ffn_gate_inp.weight") or name.endswith(".exp_probs_b.bias")):
        return name
    m = _ROUTER_RE.search(name)
    if m:
        return f"blk.{m.group(1)}.ffn_gate_inp.weight"
    m = _BIAS_RE.search(name)
    if m:
        return f"blk.{m.group(1)}.exp_probs_b.bias"
    return None


def patch_routers(in_gguf: str | os.PathLike, delta_safetensors: str | os.PathLike,
                  out_gguf: str | os.PathLike) -> list[str]:
    """Copy ``in_gguf`` to ``out_gguf`` with its router tensors replaced by those in a ReMoE router
    file (``model.layers.N.feed_forward.router.weight`` [E, H], full new weights, as saved by
    ``mobilemoe remoe``; ``...expert_bias`` and GGUF names ``blk.N.ffn_gate_inp.weight`` are also
    accepted). Only the bytes of those tensors change. Returns the GGUF tensor names patched."""
    gguf = _gguf()
    from safetensors import safe_open

    in_gguf, out_gguf = Path(in_gguf), Path(out_gguf)
    reader = gguf.GGUFReader(str(in_gguf))
    tensors = {t.name: t for t in reader.tensors}
    updates: dict[str, np.ndarray] = {}
    with safe_open(str(delta_safetensors), framework="pt") as f:
        for name in f.keys():
            target = _gguf_name(name)
            if target is None:
                raise ExportError(f"{delta_safetensors}: tensor {name!r} is not a router weight")
            if target not in tensors:
                raise ExportError(f"{in_gguf}: has no tensor {target!r} (for {name!r} in the router file)")
            t = tensors[target]
            if t.tensor_type != gguf.GGMLQuantizationType.F32:
                raise ExportError(f"{in_gguf}: {target} is {t.tensor_type.name}, expected F32")
            value = f.get_tensor(name).float().numpy()
            shape = tuple(int(x) for x in reversed(t.shape.tolist()))
            if value.shape != shape:
                raise ExportError(f"router file {name}: shape {list(value.shape)}, {target} in the GGUF "
                                  f"has {list(shape)}")
            updates[target] = np.ascontiguousarray(value, dtype=np.float32)
    if not updates:
        raise ExportError(f"{delta_safetensors}: no router tensors found")
    offsets = {n: int(tensors[n].data_offset) for n in updates}
    del reader, tensors  # release the memory map before writing
    tmp = out_gguf.with_name(f".{out_gguf.name}.tmp")
    shutil.copyfile(in_gguf, tmp)
    with open(tmp, "r+b") as fh:
        for name, value in updates.items():
            fh.seek(offsets[name])
            fh.write(value.tobytes())
    os.replace(tmp, out_gguf)
    return sorted(updates)
