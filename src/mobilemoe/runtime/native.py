"""The native INT4 backend: the whole forward in ``mobilemoe._C.NativeModel`` (one call per step).

Loading streams the checkpoint one tensor at a time and repacks each into the kernels' runtime
layout (:mod:`mobilemoe.kernels.pack`, lossless) before reading the next, so peak memory stays
near the INT4 bytes. The embedding is memory-mapped for row lookups (only the rows used become
resident) and also packed as the LM head.
"""

from __future__ import annotations

import math
import mmap
import os
from typing import TYPE_CHECKING, Sequence

import torch

from mobilemoe.checkpoint import load_tensors, mmap_tensor, quantized_names
from mobilemoe.config import MobileMoEConfig
from mobilemoe.errors import MobileMoEError
from mobilemoe.formats import RECORD_PARTS, TILE_ROWS
from mobilemoe.layout import spec_map

if TYPE_CHECKING:
    from mobilemoe.runtime.offload import ExpertOffload


def _lib():
    try:
        from mobilemoe import _C
    except ImportError as exc:
        return None, f"the extension mobilemoe._C is not built ({exc})"
    if not hasattr(_C, "NativeModel"):
        return None, "this build of mobilemoe._C has no NativeModel (rebuild: pip install --no-build-isolation -e .)"
    return _C, ""


def is_available() -> bool:
    return _lib()[0] is not None


def unavailable_reason() -> str:
    return _lib()[1]


PACK_ROWS = 4096  # rows packed at a time, whole tiles: bounds the repacking temporaries (the LM head is 128K+ rows)
HUGE_PAGE = 2 << 20


def _hugepages_enabled() -> bool:
    return (hasattr(mmap, "MADV_HUGEPAGE") and hasattr(mmap, "MAP_PRIVATE")
            and os.environ.get("MOBILEMOE_HUGEPAGES") != "0")


def _hugepage_region(nbytes: int) -> torch.Tensor:
    """nbytes (uint8) starting on a 2 MiB boundary of a private anonymous mapping whose whole 2 MiB
    chunks are advised MADV_HUGEPAGE; the returned tensor keeps the mapping alive."""
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    raw = torch.frombuffer(region, dtype=torch.uint8)
    offset = (-raw.data_ptr()) % HUGE_PAGE
    region.madvise(mmap.MADV_HUGEPAGE, offset, nbytes // HUGE_PAGE * HUGE_PAGE)
    return raw[offset:offset + nbytes]


class _SmallWeightArena:
    """Packed weights under 2 MiB (a layer's QKV, output projection, shared expert, router) side by
    side in 32 MiB huge-page regions, 64-byte aligned. In 4 KiB pages each decode GEMV of ~0.3-1.3 MB
    crossed a hundred pages the hardware prefetcher stops at."""

    REGION = 32 << 20

    def __init__(self) -> None:
        self.base: torch.Tensor | None = None
        self.used = 0

    def take(self, nbytes: int) -> torch.Tensor:
        if self.base is None or self.used + nbytes > self.base.numel():
            self.base, self.used = _hugepage_region(self.REGION), 0
        out = self.base[self.used:self.used + nbytes]
        self.used += (nbytes + 63) // 64 * 64
        return out


_small_arena = _SmallWeightArena()


def weight_buffer(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor for weights the runtime streams at decode, in transparent huge pages
    (2 MiB) when the system allows them: a decoded token reads ~150 MB spread over hundreds of
    matrices, and 2 MiB pages cut its TLB misses and let the prefetchers run on (MobileMoE-S decode
    ~4% faster here for the experts and LM head; the dense model unchanged). From 2 MiB up a buffer
    gets its own mapping (its partial last chunk keeps 4 KiB pages, so resident memory does not grow);
    smaller ones share the regions of ``_SmallWeightArena``. ``MOBILEMOE_HUGEPAGES=0`` and other
    systems: plain ``torch.empty``."""
    nbytes = math.prod(shape) * dtype.itemsize
    if not _hugepages_enabled() or nbytes == 0:
        return torch.empty(tuple(shape), dtype=dtype)
    raw = _small_arena.take(nbytes) if nbytes < HUGE_PAGE else _hugepage_region(nbytes)
    return raw.view(dtype).view(tuple(shape))


def _in_weight_buffer(t: torch.Tensor) -> torch.Tensor:
    out = weight_buffer(t.shape, t.dtype)
    out.copy_(t)
    return out


def layout_problem(path: str | os.PathLike, cfg: MobileMoEConfig) -> str | None:
    """Why the native kernels cannot read this INT4 checkpoint's layout (None if they can): they pack
    routed experts grouped along ``out`` only (``expert_quant_group_axis``)."""
    from mobilemoe.formats import DEFAULT_EXPERT_GROUP_AXIS

    if cfg.is_quantized and cfg.expert_quant_group_axis != DEFAULT_EXPERT_GROUP_AXIS:
        return (f"{os.path.join(path, 'config.json')}: field 'quantization.expert_group_axis' is "
                f"{cfg.expert_quant_group_axis!r}; the native runtime reads only routed experts grouped along "
                f"{DEFAULT_EXPERT_GROUP_AXIS!r}")
    return None


def _fields(spec, **values):
    """Set named fields of a native ModelSpec / LayerSpec (a misspelt name is an AttributeError)."""
    for name, value in values.items():
        setattr(spec, name, value)
    return spec


def _pack_rows(qweight: torch.Tensor, scale: torch.Tensor, pack_linear) -> torch.Tensor:
    """pack_linear in row chunks written into one preallocated buffer (whole tiles per chunk)."""
    first = pack_linear(qweight[:PACK_ROWS], scale[:PACK_ROWS])
    if qweight.shape[0] <= PACK_ROWS:
        return _in_weight_buffer(first)
    out = weight_buffer((-(-qweight.shape[0] // TILE_ROWS), first.shape[1]), first.dtype)
    for r in range(0, qweight.shape[0], PACK_ROWS):
        part = first if r == 0 else pack_linear(qweight[r:r + PACK_ROWS], scale[r:r + PACK_ROWS])
        out[r // TILE_ROWS: r // TILE_ROWS + part.shape[0]] = part
    return out


def _pack_experts(qweight: torch.Tensor, scale: torch.Tensor, pack_experts) -> tuple[torch.Tensor, torch.Tensor]:
    """pack_experts one expert at a time into preallocated buffers."""
    codes0, scales0 = pack_experts(qweight[:1], scale[:1])
    E = qweight.shape[0]
    codes = weight_buffer((E, *codes0.shape[1:]), codes0.dtype)
    scales = weight_buffer((E, *scales0.shape[1:]), scales0.dtype)
    for e in range(E):
        codes[e:e + 1], scales[e:e + 1] = (codes0, scales0) if e == 0 else pack_experts(qweight[e:e + 1], scale[e:e + 1])
    return codes, scales


class NativeBackend:
    """The INT4 model in ``mobilemoe._C.NativeModel``. With ``offload``, routed experts stay in the
    expert store on storage and each MoE layer caches C of them in RAM (:mod:`.offload`)."""

    def __init__(self, path: str | os.PathLike, max_seq_len: int, offload: "ExpertOffload | None" = None) -> None:
        from mobilemoe.kernels.pack import pack_experts, pack_linear
        from mobilemoe.model import rope_inv_freq
        from mobilemoe.runtime import offload as off

        _C, reason = _lib()
        if _C is None:
            raise MobileMoEError(f"native kernels unavailable: {reason}")
        cfg, tensors = load_tensors(path, lazy=True)
        if not cfg.is_quantized:
            raise MobileMoEError(f"{path}: the native runtime needs an INT4 checkpoint; run `mobilemoe quantize`")
        if cfg.attention_bias:
            raise MobileMoEError(f"{path}: attention biases are not supported by the native runtime")
        if (layout := layout_problem(path, cfg)) is not None:
            raise MobileMoEError(layout)
        self.config: MobileMoEConfig = cfg.replace(quantization=None)
        self.max_seq_len = max_seq_len
        self.capacity: int | None = None  # experts cached per MoE layer when offloading
        store_index: dict | None = None
        if offload is not None:
            self.capacity = off.resolve_capacity(cfg, offload, max_seq_len)
            store = off.open_store(path, cfg, offload.store_dir)
            self.store_dir, store_index = store.dir, store.index
        specs = spec_map(cfg)

        def q(name: str) -> tuple[torch.Tensor, torch.Tensor]:
            qn, sn = quantized_names(specs[name])
            return tensors[qn], tensors[sn]

        def linear(*names: str) -> torch.Tensor:  # several [out_i, in] weights fused along out
            parts = [q(n) for n in names]
            return _pack_rows(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), pack_linear)

        def f32(name: str) -> torch.Tensor:
            return tensors[name].float()

        pos = torch.arange(max_seq_len, dtype=torch.float32)
        angles = pos[:, None] * rope_inv_freq(cfg)[None, :]
        head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
        qe, se = quantized_names(specs["model.embed_tokens.weight"])
        has_moe = cfg.num_local_experts > 0 and any(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
        self.model = _C.NativeModel(_fields(
            _C.ModelSpec(), hidden=cfg.hidden_size, n_heads=cfg.num_attention_heads,
            n_kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, vocab=cfg.vocab_size,
            experts=cfg.num_local_experts if has_moe else 0, top_k=cfg.num_experts_per_tok if has_moe else 0,
            routed_width=cfg.intermediate_size if has_moe else 0, eps=cfg.rms_norm_eps,
            routed_scale=cfg.routed_scaling_factor, norm_topk=cfg.norm_topk_prob,
            sigmoid_router=cfg.router_type == "sigmoid", qk_norm=cfg.use_qk_norm, max_len=max_seq_len,
            rope_cos=angles.cos(), rope_sin=angles.sin(), embed_codes=mmap_tensor(path, qe),
            embed_scales=mmap_tensor(path, se), lm_head=linear(head), final_norm=f32("model.norm.weight")))
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}"
            attn = [f"{p}.self_attn.{x}_proj.weight" for x in "qkvo"]
            layer = _fields(_C.LayerSpec(), input_norm=f32(f"{p}.input_layernorm.weight"),
                            post_norm=f32(f"{p}.post_attention_layernorm.weight"), qkv=linear(*attn[:3]),
                            o=linear(attn[3]), rope=cfg.uses_rope(i), moe=cfg.is_moe_layer(i))
            ffn = f"{p}.feed_forward" + (".shared_expert" if cfg.is_moe_layer(i) else "")
            if not cfg.is_moe_layer(i) or cfg.num_shared_experts > 0:  # the dense FFN or the shared expert
                _fields(layer, ffn_gate_up=linear(f"{ffn}.gate_proj.weight", f"{ffn}.up_proj.weight"),
                        ffn_down=linear(f"{ffn}.down_proj.weight"), ffn_width=cfg.intermediate_size_mlp)
            if cfg.is_moe_layer(i):
                if store_index is not None:  # empty cache slots, filled from the store on demand
                    experts = off.slot_tensors(store_index, i, self.capacity)
                else:
                    experts = [*_pack_experts(*q(f"{p}.feed_forward.experts.gate_up_proj"), pack_experts),
                               *_pack_experts(*q(f"{p}.feed_forward.experts.down_proj"), pack_experts)]
                _fields(layer, router=_in_weight_buffer(f32(f"{p}.feed_forward.router.weight")),  # read every token
                        expert_bias=f32(f"{p}.feed_forward.expert_bias"),
                        **dict(zip(RECORD_PARTS, experts)))  # LayerSpec names them alike
            self.model.add_layer(layer)
        if store_index is not None:
            try:  # the very file whose records open_store verified
                self.model.open_expert_store(store.native_path(), offload.drop_page_cache)
            finally:
                store.close()
            for i in range(cfg.num_hidden_layers):
                if cfg.is_moe_layer(i):
                    self.model.offload_layer(i, off.record_offsets(store_index, i))

    def offload_stats(self) -> dict:
        """Expert-cache counters since the last reset: hits, misses, bytes_read, read_seconds."""
        st = self.model.offload_stats()
        return {"hits": int(st["hits"]), "misses": int(st["misses"]), "bytes_read": int(st["bytes_read"]),
                "read_seconds": st["read_seconds"], "capacity": self.capacity}

    def reset_offload_stats(self) -> None:
        self.model.reset_offload_stats()

    def reset(self) -> None:
        pass  # positions are explicit; stale cache entries past the new position are never read

    def forward(self, ids: Sequence[int], start_pos: int) -> torch.Tensor:
        return self.model.forward(torch.as_tensor(list(ids), dtype=torch.long), start_pos)
