"""Expert offloading: routed experts on storage, a RAM cache of C experts per MoE layer.

The **expert store** is one file (``experts.bin``) plus an index (``experts.json``). Each routed
expert of each MoE layer is one page-aligned record in the native kernels' packed layout
(:func:`mobilemoe.kernels.pack.pack_experts`), so a miss is one ``preadv`` straight into a cache
slot, with no repacking on the decode path::

    record = gate_up codes | gate_up scales | down codes | down scales      (per expert, 4 KiB aligned)

The native runtime (:class:`mobilemoe.runtime.native.NativeBackend` with an :class:`ExpertOffload`)
keeps C slots per MoE layer, evicts the least recently used expert that the current step does not
need, and counts hits, misses, bytes read and read time. ``drop_page_cache`` asks the kernel to drop
each record's pages after reading it (``posix_fadvise DONTNEED``), so a later miss on the same expert
reads the device again rather than the OS page cache (best effort: the kernel may keep pages that
another process maps).

Memory: ``--max-memory`` is a budget for the model's own buffers -- every non-expert weight, the
fp16 KV cache at ``max_seq_len`` and the expert slots -- not for the Python process (the
interpreter and torch add ~150-250 MB of RSS of their own); :func:`plan_capacity` turns it into C.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from mobilemoe.config import MobileMoEConfig
from mobilemoe.errors import MobileMoEError

STORE_FILE = "experts.bin"
STORE_INDEX = "experts.json"
STORE_FORMAT = "mobilemoe-expert-store-v2"  # v2: normalised expert scale rows
PARTS = ("gu_codes", "gu_scales", "dn_codes", "dn_scales")
ALIGN = 4096


@dataclass(frozen=True)
class ExpertOffload:
    """How to offload: a cache of ``capacity`` experts per MoE layer, or as many as ``max_memory``
    bytes allow (one of the two); the store directory (default: ``<checkpoint>/expert-store``,
    written on first use)."""

    capacity: int | None = None
    max_memory: int | None = None
    store_dir: str | os.PathLike | None = None
    drop_page_cache: bool = True


def _moe_layers(cfg: MobileMoEConfig) -> list[int]:
    return [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]


def resident_bytes(cfg: MobileMoEConfig, max_seq_len: int) -> int:
    """Bytes the offloading runtime keeps in RAM besides the expert slots: every weight but the
    routed experts, plus the fp16 KV cache at ``max_seq_len``."""
    from mobilemoe.accounting import kv_cache_bytes, routed_expert_bytes, weight_bytes

    experts = len(_moe_layers(cfg)) * cfg.num_local_experts * routed_expert_bytes(cfg)
    return weight_bytes(cfg) - experts + kv_cache_bytes(cfg, max_seq_len)


def plan_capacity(cfg: MobileMoEConfig, max_memory: int, max_seq_len: int) -> int:
    """The largest per-layer cache capacity C (at most E) whose memory fits ``max_memory`` bytes.

    Raises when even C = top-k (the least a token can run with) does not fit, naming the numbers.
    """
    from mobilemoe.accounting import runtime_expert_bytes

    base = resident_bytes(cfg, max_seq_len)
    per_slot = len(_moe_layers(cfg)) * runtime_expert_bytes(cfg)
    capacity = min(cfg.num_local_experts, (max_memory - base) // per_slot) if max_memory > base else 0
    if capacity < cfg.num_experts_per_tok:
        need = base + cfg.num_experts_per_tok * per_slot
        raise MobileMoEError(
            f"--max-memory {max_memory / 1e6:.1f} MB is too small: the non-expert weights and the KV cache "
            f"at {max_seq_len} tokens take {base / 1e6:.1f} MB, and each MoE layer needs at least top-k = "
            f"{cfg.num_experts_per_tok} cached experts ({per_slot / 1e6:.2f} MB per slot across layers); "
            f"give at least {need / 1e6:.1f} MB or a smaller --max-seq-len")
    return int(capacity)


def resolve_capacity(cfg: MobileMoEConfig, offload: ExpertOffload, max_seq_len: int) -> int:
    if not _moe_layers(cfg):
        raise MobileMoEError("expert offloading: the model has no MoE layers, so there are no experts to offload")
    if (offload.capacity is None) == (offload.max_memory is None):
        raise MobileMoEError("expert offloading: give exactly one of a cache capacity or a memory budget")
    if offload.capacity is not None:
        k, E = cfg.num_experts_per_tok, cfg.num_local_experts
        if not k <= offload.capacity <= E:
            raise MobileMoEError(f"expert cache capacity {offload.capacity} must be between top-k ({k}) and the "
                                 f"number of experts ({E}): a token needs its {k} experts resident at once")
        return offload.capacity
    return plan_capacity(cfg, offload.max_memory, max_seq_len)


# ---------------------------------------------------------------------- the store file
def write_expert_store(int4_ckpt: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write every routed expert of an INT4 checkpoint as page-aligned packed records (atomic)."""
    from mobilemoe.checkpoint import load_tensors
    from mobilemoe.kernels.pack import pack_experts
    from mobilemoe.utils import atomic_path, atomic_write_text

    cfg, tensors = load_tensors(int4_ckpt, lazy=True)
    if not cfg.is_quantized:
        raise MobileMoEError(f"{int4_ckpt}: not an INT4 checkpoint (quantize it first: mobilemoe quantize)")
    if not _moe_layers(cfg):
        raise MobileMoEError(f"{int4_ckpt}: the model has no MoE layers, so there are no experts to offload")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index: dict = {"format": STORE_FORMAT, "align": ALIGN, "num_experts": cfg.num_local_experts,
                   "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
                   "parts": list(PARTS), "layers": {}}
    offset = 0
    with atomic_path(out / STORE_FILE) as tmp, open(tmp, "wb") as fh:
        for i in _moe_layers(cfg):
            p = f"model.layers.{i}.feed_forward.experts"
            entries = []
            for e in range(cfg.num_local_experts):
                gu = pack_experts(tensors[f"{p}.gate_up_qweight"][e:e + 1], tensors[f"{p}.gate_up_scale"][e:e + 1])
                dn = pack_experts(tensors[f"{p}.down_qweight"][e:e + 1], tensors[f"{p}.down_scale"][e:e + 1])
                parts, blob = [], bytearray()
                for name, t in zip(PARTS, (gu[0][0], gu[1][0], dn[0][0], dn[1][0])):
                    raw = t.contiguous().view(torch.uint8).numpy().tobytes()
                    parts.append({"name": name, "dtype": str(t.dtype).removeprefix("torch."),
                                  "shape": list(t.shape), "offset": len(blob), "nbytes": len(raw)})
                    blob += raw
                pad = (-offset) % ALIGN
                fh.write(b"\0" * pad)
                offset += pad
                entries.append({"offset": offset, "nbytes": len(blob), "parts": parts})
                fh.write(blob)
                offset += len(blob)
            index["layers"][str(i)] = entries
    atomic_write_text(out / STORE_INDEX, json.dumps(index) + "\n")
    return out


def read_store_index(store_dir: str | os.PathLike, cfg: MobileMoEConfig | None = None) -> dict:
    """The store's index, checked against ``cfg`` (layers, experts, sizes) when given."""
    d = Path(store_dir)
    try:
        index = json.loads((d / STORE_INDEX).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MobileMoEError(f"{d}: no expert store here ({STORE_INDEX} missing); write one with "
                             "mobilemoe.runtime.offload.write_expert_store") from None
    except json.JSONDecodeError as exc:
        raise MobileMoEError(f"{d / STORE_INDEX}: not valid JSON ({exc})") from None
    if index.get("format") != STORE_FORMAT:
        raise MobileMoEError(f"{d / STORE_INDEX}: format {index.get('format')!r}, expected {STORE_FORMAT!r}")
    if cfg is not None:
        want = {"num_experts": cfg.num_local_experts, "hidden_size": cfg.hidden_size,
                "intermediate_size": cfg.intermediate_size}
        for key, value in want.items():
            if index.get(key) != value:
                raise MobileMoEError(f"{d / STORE_INDEX}: {key} {index.get(key)}, but the checkpoint has {value}: "
                                     "the store was written for another model")
        layers = sorted(int(k) for k in index["layers"])
        if layers != _moe_layers(cfg):
            raise MobileMoEError(f"{d / STORE_INDEX}: MoE layers {layers}, but the checkpoint has {_moe_layers(cfg)}")
    return index


def ensure_store(int4_ckpt: str | os.PathLike, cfg: MobileMoEConfig,
                 store_dir: str | os.PathLike | None) -> tuple[Path, dict]:
    """The store for ``int4_ckpt`` and its index (checked against ``cfg``): ``store_dir`` (default
    ``<checkpoint>/expert-store``), written if absent or in an older store format."""
    d = Path(store_dir) if store_dir is not None else Path(int4_ckpt) / "expert-store"
    if not (d / STORE_INDEX).exists() or not (d / STORE_FILE).exists() or _older_format(d):
        write_expert_store(int4_ckpt, d)
    return d, read_store_index(d, cfg)


def _older_format(d: Path) -> bool:
    """A store an earlier version wrote (its packed layout differs): rewritten from the checkpoint."""
    try:
        fmt = json.loads((d / STORE_INDEX).read_text(encoding="utf-8")).get("format", "")
    except (OSError, json.JSONDecodeError, AttributeError):
        return False  # not ours to overwrite: read_store_index reports it
    return isinstance(fmt, str) and fmt.startswith("mobilemoe-expert-store-") and fmt != STORE_FORMAT


def slot_tensors(index: dict, layer: int, capacity: int) -> list[torch.Tensor]:
    """Empty cache slots [C, ...] for one layer, shaped like the store's parts (PARTS order)."""
    parts = index["layers"][str(layer)][0]["parts"]
    return [torch.empty((capacity, *p["shape"]), dtype=getattr(torch, p["dtype"])) for p in parts]


def record_offsets(index: dict, layer: int) -> torch.Tensor:
    return torch.tensor([r["offset"] for r in index["layers"][str(layer)]], dtype=torch.long)
