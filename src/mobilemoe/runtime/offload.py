"""Expert offloading: routed experts on storage, a RAM cache of C experts per MoE layer.

The **expert store** is one file (``experts.bin``) plus an index (``experts.json``). Each routed
expert of each MoE layer is one page-aligned record in the native kernels' packed layout
(:func:`mobilemoe.kernels.pack.pack_experts`), so a miss is one ``preadv`` straight into a cache
slot, with no repacking on the decode path::

    record = gate_up codes | gate_up scales | down codes | down scales      (per expert, 4 KiB aligned)

(the record layout's constants: :mod:`mobilemoe.formats`).

The native runtime (:class:`mobilemoe.runtime.native.NativeBackend` with an :class:`ExpertOffload`)
keeps C slots per MoE layer, evicts the least recently used expert that the current step does not
need, and counts hits, misses, bytes read and read time. ``drop_page_cache`` asks the kernel to drop
each record's pages after reading it (``posix_fadvise DONTNEED``), so a later miss on the same expert
reads the device again rather than the OS page cache (best effort: the kernel may keep pages that
another process maps).

Memory: ``--max-memory`` is a budget for the model's own buffers -- every non-expert weight, the
fp16 KV cache at ``max_seq_len`` and the expert slots -- not for the Python process (the
interpreter and torch add ~150-250 MB of RSS of their own); :func:`plan_capacity` turns it into C.

Integrity: the index records the sha256 of every record and a fingerprint of the checkpoint it was
made from (a sha256 of the experts' INT4 codes and scales, plus the files' size/mtime/ctime/inode so
an unchanged checkpoint is not re-hashed). :func:`open_store` refuses another model's store, rewrites
a stale or corrupted one, and checks every record's sha256 before the runtime reads it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from mobilemoe.config import MobileMoEConfig
from mobilemoe.errors import MobileMoEError
from mobilemoe.formats import CODE_DTYPE, EXPERT_STORE_FORMAT, RECORD_ALIGN, RECORD_PARTS, SCALE_DTYPE

STORE_FILE = "experts.bin"
STORE_INDEX = "experts.json"
STORE_FORMAT = EXPERT_STORE_FORMAT
RACY_NS = 2_000_000_000  # a file changed this recently may change again without a new timestamp


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
def _expert_names(cfg: MobileMoEConfig) -> dict[int, list[str]]:
    """MoE layer -> the checkpoint tensors its records are cut from: gate_up (codes, scales), then
    down (codes, scales), the order of :data:`~mobilemoe.formats.RECORD_PARTS`."""
    from mobilemoe.checkpoint import quantized_names
    from mobilemoe.layout import tensor_specs

    out: dict[int, list[str]] = {}
    for spec in tensor_specs(cfg):
        if spec.role == "experts":
            out.setdefault(spec.layer, []).extend(quantized_names(spec))
    return out


def _raw(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().view(torch.uint8).numpy()).cast("B")


def _record(gu: tuple[torch.Tensor, torch.Tensor], dn: tuple[torch.Tensor, torch.Tensor]) -> tuple[list[dict], bytes]:
    """One expert's packed (codes, scales) of gate_up and down -> (the index's parts, the record bytes)."""
    parts, blob = [], bytearray()
    for name, t in zip(RECORD_PARTS, (*gu, *dn)):
        raw = _raw(t)
        parts.append({"name": name, "dtype": str(t.dtype).removeprefix("torch."),
                      "shape": list(t.shape), "offset": len(blob), "nbytes": len(raw)})
        blob += raw
    return parts, bytes(blob)


def _expected_parts(cfg: MobileMoEConfig) -> list[dict]:
    """The parts every record of ``cfg``'s store must have: those of a packed all-zero expert."""
    from mobilemoe.checkpoint import expected_tensors
    from mobilemoe.kernels.pack import pack_experts

    shapes = expected_tensors(cfg)
    gu_q, gu_s, dn_q, dn_s = (shapes[n][1:] for n in _expert_names(cfg)[_moe_layers(cfg)[0]])
    gu = pack_experts(torch.zeros(1, *gu_q, dtype=CODE_DTYPE), torch.zeros(1, *gu_s, dtype=SCALE_DTYPE))
    dn = pack_experts(torch.zeros(1, *dn_q, dtype=CODE_DTYPE), torch.zeros(1, *dn_s, dtype=SCALE_DTYPE))
    return _record((gu[0][0], gu[1][0]), (dn[0][0], dn[1][0]))[0]


def _source_key(ckpt: Path, cfg: MobileMoEConfig) -> list | None:
    """[name, size, mtime_ns, ctime_ns, inode] of each checkpoint file holding routed experts: while it is
    unchanged, the content fingerprint recorded with it still holds. None when a file changed in the
    last 2 s: timestamps are coarse (one kernel tick), so a rewrite in the same tick could keep them
    and only the content hash can tell (the "racy git" rule)."""
    from mobilemoe.checkpoint import _files

    files = _files(ckpt)
    now, key = time.time_ns(), []
    for path in sorted({files[n] for names in _expert_names(cfg).values() for n in names}):
        st = path.stat()
        if now - max(st.st_mtime_ns, st.st_ctime_ns) < RACY_NS:
            return None
        key.append([path.name, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino])
    return key


def _hash_tensors(h, names: list[str], tensors) -> None:
    for name, t in zip(names, tensors):
        h.update(f"{name} {t.dtype} {list(t.shape)}\n".encode())
        h.update(_raw(t))


def checkpoint_fingerprint(int4_ckpt: str | os.PathLike) -> str:
    """sha256 over the routed experts' INT4 codes and scales (names, dtypes, shapes, bytes) of a checkpoint."""
    from mobilemoe.checkpoint import load_tensors

    cfg, tensors = load_tensors(int4_ckpt, lazy=True)
    h = hashlib.sha256()
    for names in _expert_names(cfg).values():
        _hash_tensors(h, names, [tensors[n] for n in names])
    return h.hexdigest()


def write_expert_store(int4_ckpt: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write every routed expert of an INT4 checkpoint as page-aligned packed records, each with its
    sha256, and the checkpoint's fingerprint (atomic; the directory is locked while it is written)."""
    from mobilemoe.checkpoint import load_tensors
    from mobilemoe.utils import output_lock

    cfg, tensors = load_tensors(int4_ckpt, lazy=True)
    if not cfg.is_quantized:
        raise MobileMoEError(f"{int4_ckpt}: not an INT4 checkpoint (quantize it first: mobilemoe quantize)")
    from mobilemoe.runtime.native import layout_problem  # records hold the native kernels' layout

    if (layout := layout_problem(int4_ckpt, cfg)) is not None:
        raise MobileMoEError(f"{layout}, and so does the expert store (quantize with expert_quant_group_axis 'out')")
    if not _moe_layers(cfg):
        raise MobileMoEError(f"{int4_ckpt}: the model has no MoE layers, so there are no experts to offload")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise MobileMoEError(f"{out}: expert store path exists and is not a directory; give a directory "
                             "(--expert-store DIR)")
    if out.is_dir() and not os.access(out, os.W_OK | os.X_OK):
        raise MobileMoEError(f"{out}: the expert store must be (re)written but the directory is not writable; "
                             "give a writable --expert-store DIR")
    key = _source_key(Path(int4_ckpt), cfg)  # taken before reading: a change while we read shows later
    try:
        with output_lock(out, "expert store"):
            _write_records(cfg, tensors, out, key)
    except OSError as exc:
        raise MobileMoEError(f"{out}: cannot write the expert store: {exc.strerror or exc}; give a writable "
                             "--expert-store DIR") from None
    return out


def _write_records(cfg: MobileMoEConfig, tensors, out: Path, key: list | None) -> None:
    from mobilemoe.kernels.pack import pack_experts
    from mobilemoe.utils import atomic_path, atomic_write_text

    index: dict = {"format": STORE_FORMAT, "align": RECORD_ALIGN, "num_experts": cfg.num_local_experts,
                   "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
                   "parts": list(RECORD_PARTS), "source": {"files": key}, "layers": {}}
    fingerprint = hashlib.sha256()
    offset = 0
    with atomic_path(out / STORE_FILE) as tmp, open(tmp, "wb") as fh:
        for i, names in _expert_names(cfg).items():
            gu_q, gu_s, dn_q, dn_s = (tensors[n] for n in names)  # each read once per layer
            _hash_tensors(fingerprint, names, (gu_q, gu_s, dn_q, dn_s))
            entries = []
            for e in range(cfg.num_local_experts):
                gu = pack_experts(gu_q[e:e + 1], gu_s[e:e + 1])
                dn = pack_experts(dn_q[e:e + 1], dn_s[e:e + 1])
                parts, blob = _record((gu[0][0], gu[1][0]), (dn[0][0], dn[1][0]))
                pad = (-offset) % RECORD_ALIGN
                fh.write(b"\0" * pad)
                offset += pad
                entries.append({"offset": offset, "nbytes": len(blob), "parts": parts,
                                "sha256": hashlib.sha256(blob).hexdigest()})
                fh.write(blob)
                offset += len(blob)
            index["layers"][str(i)] = entries
    index["source"]["experts_sha256"] = fingerprint.hexdigest()
    atomic_write_text(out / STORE_INDEX, json.dumps(index) + "\n")


def read_store_index(store_dir: str | os.PathLike, cfg: MobileMoEConfig | None = None) -> dict:
    """The store's index, checked against ``cfg`` (layers, experts, sizes) when given."""
    d = Path(store_dir)
    try:
        index = json.loads((d / STORE_INDEX).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MobileMoEError(f"{d}: no expert store here ({STORE_INDEX} missing); write one with "
                             "mobilemoe.runtime.offload.write_expert_store") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MobileMoEError(f"{d / STORE_INDEX}: cannot read the expert store index: {exc}") from None
    except json.JSONDecodeError as exc:
        raise MobileMoEError(f"{d / STORE_INDEX}: not valid JSON ({exc})") from None
    fmt = index.get("format") if isinstance(index, dict) else None
    if fmt != STORE_FORMAT:
        raise MobileMoEError(f"{d / STORE_INDEX}: format {fmt!r}, expected {STORE_FORMAT!r}")
    layers = index.get("layers")
    if not (isinstance(layers, dict) and all(k.isdigit() and isinstance(v, list) for k, v in layers.items())):
        raise MobileMoEError(f"{d / STORE_INDEX}: field 'layers': expected an object of layer -> record list")
    if cfg is not None:
        want = {"num_experts": cfg.num_local_experts, "hidden_size": cfg.hidden_size,
                "intermediate_size": cfg.intermediate_size}
        for key, value in want.items():
            if index.get(key) != value:
                raise MobileMoEError(f"{d / STORE_INDEX}: {key} {index.get(key)}, but the checkpoint has {value}: "
                                     "the store was written for another model")
        found = sorted(int(k) for k in layers)
        if found != _moe_layers(cfg):
            raise MobileMoEError(f"{d / STORE_INDEX}: MoE layers {found}, but the checkpoint has {_moe_layers(cfg)}")
    return index


@dataclass
class ExpertStore:
    """An expert store checked against its checkpoint, with ``experts.bin`` open: the bytes the
    checksums were verified on are the ones the native runtime reads (see :meth:`native_path`)."""

    dir: Path
    index: dict
    file: BinaryIO

    def native_path(self) -> str:
        """A path to the verified file itself: ``/proc/self/fd/N`` where there is one, so a store
        rewritten (renamed over) after the check is not the one read."""
        proc = f"/proc/self/fd/{self.file.fileno()}"
        return proc if os.path.exists(proc) else str(self.dir / STORE_FILE)

    def close(self) -> None:
        self.file.close()


def open_store(int4_ckpt: str | os.PathLike, cfg: MobileMoEConfig,
               store_dir: str | os.PathLike | None = None) -> ExpertStore:
    """The store for ``int4_ckpt`` (default ``<checkpoint>/expert-store``), verified: its index matches
    ``cfg`` (else refused), it was made from this checkpoint's expert bytes and every record matches
    its sha256 (else rewritten from the checkpoint, with a note on stderr). Absent or in an older
    format: written. Costs one read and sha256 of the store per open (0.8-1.6 GB/s on one core:
    ~0.4-0.8 s for MobileMoE-S's 600 MB of experts, ~1 ms for tiny-moe) and, when the checkpoint files'
    size/mtime/ctime/inode changed since the store was written, one hash of its experts."""
    ckpt = Path(int4_ckpt)
    d = Path(store_dir) if store_dir is not None else ckpt / "expert-store"
    reason = _stale_reason(ckpt, cfg, d)
    if reason is None:
        store = ExpertStore(d, read_store_index(d, cfg), open(d / STORE_FILE, "rb"))
        reason = _bad_record(store, cfg)
        if reason is None:
            return store
        store.close()
    if reason != _ABSENT:
        print(f"mobilemoe: expert store {d}: {reason}; rewriting it from {ckpt}", file=sys.stderr)
    write_expert_store(ckpt, d)
    store = ExpertStore(d, read_store_index(d, cfg), open(d / STORE_FILE, "rb"))
    bad = _bad_record(store, cfg)
    if bad is not None:
        store.close()
        raise MobileMoEError(f"expert store {d}: {bad} right after it was written: the storage is not "
                             "returning the bytes written to it")
    return store


def ensure_store(int4_ckpt: str | os.PathLike, cfg: MobileMoEConfig,
                 store_dir: str | os.PathLike | None) -> tuple[Path, dict]:
    """:func:`open_store`, returning the store directory and its index."""
    store = open_store(int4_ckpt, cfg, store_dir)
    store.close()
    return store.dir, store.index


_ABSENT = "absent"


def _stale_reason(ckpt: Path, cfg: MobileMoEConfig, d: Path) -> str | None:
    """Why the store in ``d`` must be (re)written from ``ckpt``, or None. Raises for a store that is
    not ours to overwrite (another format, another model's shapes)."""
    if not (d / STORE_INDEX).exists() or not (d / STORE_FILE).exists():
        return _ABSENT
    if _older_format(d):
        return "written by an older version (another packed layout)"
    index = read_store_index(d, cfg)
    source = index.get("source") if isinstance(index.get("source"), dict) else {}
    key = _source_key(ckpt, cfg)
    if key is not None and source.get("files") == key:
        return None  # the files are the ones the fingerprint was taken of
    if source.get("experts_sha256") != checkpoint_fingerprint(ckpt):
        return "made from other expert weights than the checkpoint's (fingerprint differs)"
    if key is not None:  # same content in other files (a copy, a rewrite): remember them, best effort
        try:
            from mobilemoe.utils import atomic_write_text

            atomic_write_text(d / STORE_INDEX, json.dumps({**index, "source": {**source, "files": key}}) + "\n")
        except OSError:
            pass
    return None


def _bad_record(store: ExpertStore, cfg: MobileMoEConfig) -> str | None:
    """The first record whose layout, place in the file or sha256 is wrong, as a phrase; None if all hold."""
    expected = _expected_parts(cfg)
    nbytes = sum(p["nbytes"] for p in expected)
    size = os.fstat(store.file.fileno()).st_size
    for layer in _moe_layers(cfg):
        records = store.index["layers"][str(layer)]
        if len(records) != cfg.num_local_experts:
            return f"layer {layer} has {len(records)} records, expected {cfg.num_local_experts}"
        for e, r in enumerate(records):
            where = f"the record of layer {layer} expert {e}"
            if not isinstance(r, dict) or r.get("parts") != expected or r.get("nbytes") != nbytes:
                return f"{where} does not have the packed layout of this model"
            off = r.get("offset")
            if not isinstance(off, int) or off < 0 or off % RECORD_ALIGN or off + nbytes > size:
                return f"{where} lies outside the file ({STORE_FILE} has {size} bytes)"
            store.file.seek(off)
            if hashlib.sha256(store.file.read(nbytes)).hexdigest() != r.get("sha256"):
                return f"{where} fails its sha256 checksum"
    return None


def _older_format(d: Path) -> bool:
    """A store an earlier version wrote (its packed layout differs): rewritten from the checkpoint."""
    try:
        fmt = json.loads((d / STORE_INDEX).read_text(encoding="utf-8")).get("format", "")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False  # not ours to overwrite: read_store_index reports it
    return isinstance(fmt, str) and fmt.startswith("mobilemoe-expert-store-") and fmt != STORE_FORMAT


def slot_tensors(index: dict, layer: int, capacity: int) -> list[torch.Tensor]:
    """Empty cache slots [C, ...] for one layer, shaped like the store's parts (RECORD_PARTS order)."""
    parts = index["layers"][str(layer)][0]["parts"]
    return [torch.empty((capacity, *p["shape"]), dtype=getattr(torch, p["dtype"])) for p in parts]


def record_offsets(index: dict, layer: int) -> torch.Tensor:
    return torch.tensor([r["offset"] for r in index["layers"][str(layer)]], dtype=torch.long)
