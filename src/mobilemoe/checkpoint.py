"""Checkpoints: ``config.json`` + ``model.safetensors`` (sharded with an index above a size).

The name map lives here and only here: :func:`expected_tensors` turns the layout of a config
(:mod:`mobilemoe.layout`, whose names equal the model's ``state_dict`` keys) into the tensor names
and shapes a file must hold, in the BF16/FP32 format or the packed ``mobilemoe-int4-g32`` format of
the released QAT checkpoints (``X.weight`` -> ``X.qweight`` + ``X.weight_scale``;
``experts.gate_up_proj`` -> ``experts.gate_up_qweight`` + ``experts.gate_up_scale``; likewise down).

Every file is written atomically (temp file + rename). Loading validates the whole file set first
and reports every missing, unexpected or wrong-shaped tensor in one message.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mobilemoe.config import MobileMoEConfig
from mobilemoe.errors import MobileMoEError
from mobilemoe.layout import QUANTIZED_ROLES, TensorSpec, tensor_specs
from mobilemoe.utils import atomic_path, atomic_write_text

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
MAX_LISTED = 12  # names listed per category in an error message


class CheckpointError(MobileMoEError):
    """A checkpoint file set is missing, unreadable, or does not match its config."""


# ---------------------------------------------------------------------- the name map
def quantized_names(spec: TensorSpec) -> tuple[str, str]:
    """The (codes, scales) tensor names of a quantized tensor in the released INT4 layout."""
    if spec.role == "experts":  # ...experts.gate_up_proj -> ...experts.gate_up_qweight / gate_up_scale
        stem = spec.name.removesuffix("_proj")
        return f"{stem}_qweight", f"{stem}_scale"
    stem = spec.name.removesuffix(".weight")  # X.weight -> X.qweight / X.weight_scale
    return f"{stem}.qweight", f"{stem}.weight_scale"


def expected_tensors(cfg: MobileMoEConfig) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape that a checkpoint of this config must contain (format from cfg.quantization)."""
    out: dict[str, tuple[int, ...]] = {}
    group = int((cfg.quantization or {}).get("group_size", 32))
    for spec in tensor_specs(cfg):
        if cfg.is_quantized and spec.role in QUANTIZED_ROLES:
            qname, sname = quantized_names(spec)
            *lead, n = spec.shape
            out[qname] = (*lead, n // 2)
            out[sname] = (*lead, n // group)
        else:
            out[spec.name] = spec.shape
    return out


# ---------------------------------------------------------------------- saving
def _shard(names: list[str], tensors: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def save_tensors(tensors: dict[str, torch.Tensor], cfg: MobileMoEConfig, out_dir: str | os.PathLike,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Validate ``tensors`` against the config's name map and write the checkpoint directory."""
    _validate(cfg, {k: tuple(v.shape) for k, v in tensors.items()}, where=str(out_dir))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = list(expected_tensors(cfg))  # layout order, stable across saves
    contiguous = {k: tensors[k].detach().contiguous().cpu() for k in names}
    shards = _shard(names, contiguous, max_shard_bytes)
    metadata = {"format": "pt", "mobilemoe": "1"}
    if len(shards) == 1:
        with atomic_path(out / SINGLE_FILE) as tmp:
            save_file(contiguous, str(tmp), metadata=metadata)
        _remove(out / INDEX_FILE, *out.glob("model-*-of-*.safetensors"))
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            with atomic_path(out / fname) as tmp:
                save_file({k: contiguous[k] for k in shard}, str(tmp), metadata=metadata)
            weight_map.update({k: fname for k in shard})
        total = sum(t.numel() * t.element_size() for t in contiguous.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        atomic_write_text(out / INDEX_FILE, json.dumps(index, indent=2) + "\n")
        keep = set(weight_map.values())
        _remove(out / SINGLE_FILE, *(p for p in out.glob("model-*-of-*.safetensors") if p.name not in keep))
    cfg.to_json(out / "config.json")
    return out


def cast_floating(cfg: MobileMoEConfig, state: Mapping[str, torch.Tensor],
                  dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Cast every floating tensor to ``dtype`` except the routers, which always stay fp32."""
    routers = {s.name for s in tensor_specs(cfg) if s.role == "router"}
    return {k: (v if k in routers or not v.is_floating_point() else v.to(dtype)) for k, v in state.items()}


def save_checkpoint(model: torch.nn.Module, out_dir: str | os.PathLike, dtype: torch.dtype | None = None,
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Save a (float) model. ``dtype`` casts floating tensors on the way out; routers stay fp32."""
    cfg: MobileMoEConfig = model.config
    state = model.state_dict()
    if dtype is not None:
        state = cast_floating(cfg, state, dtype)
        cfg = cfg.replace(torch_dtype=str(dtype).removeprefix("torch."))
    return save_tensors(state, cfg, out_dir, max_shard_bytes)


def _remove(*paths: Path) -> None:
    for p in paths:
        if p.exists():
            p.unlink()


# ---------------------------------------------------------------------- loading
def _validate(cfg: MobileMoEConfig, shapes: dict[str, tuple[int, ...]], where: str) -> None:
    expected = expected_tensors(cfg)
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    wrong = [f"{k}: expected {list(expected[k])}, got {list(shapes[k])}"
             for k in expected if k in shapes and tuple(shapes[k]) != tuple(expected[k])]
    if missing or unexpected or wrong:
        fmt = cfg.quantization["format"] if cfg.is_quantized else "float"
        parts = [f"{where}: tensors do not match the config ({fmt} format)"]
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if items:
                shown = "; ".join(items[:MAX_LISTED])
                more = f" (+{len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else ""
                parts.append(f"{label} ({len(items)}): {shown}{more}")
        raise CheckpointError("\n  ".join(parts))


def _files(ckpt: Path) -> dict[str, Path]:
    """tensor name -> file that holds it (index if sharded)."""
    index = ckpt / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: not a valid safetensors index ({exc})") from None
        return {name: ckpt / fname for name, fname in weight_map.items()}
    single = ckpt / SINGLE_FILE
    if not single.exists():
        raise CheckpointError(f"{ckpt}: no {SINGLE_FILE} or {INDEX_FILE} found")
    return {name: single for name in _read_names(single)}


@contextlib.contextmanager
def _open(path: Path) -> Iterator:
    """safe_open with every failure turned into a CheckpointError naming the file."""
    if not path.exists():
        raise CheckpointError(f"{path}: shard named in the index is missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            yield f
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors raises its own error types for bad headers/data
        raise CheckpointError(f"{path}: not a readable safetensors file, it may be truncated or "
                              f"corrupted ({type(exc).__name__}: {exc})") from None


def _read_names(path: Path) -> list[str]:
    with _open(path) as f:
        return list(f.keys())


def _read_tensors(files: dict[str, Path], names: Iterable[str]) -> dict[str, torch.Tensor]:
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    out: dict[str, torch.Tensor] = {}
    for path, wanted in by_file.items():
        with _open(path) as f:
            for name in wanted:
                out[name] = f.get_tensor(name)
    return out


def _shapes(files: dict[str, Path]) -> dict[str, tuple[int, ...]]:
    """Shapes of the tensors each file actually holds (a name the index misplaces counts as missing)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path in sorted(set(files.values())):
        with _open(path) as f:
            for name in f.keys():
                if files.get(name) == path:
                    shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


class LazyTensors(Mapping):
    """Checkpoint tensors read one at a time on access (nothing is held): for streaming loaders."""

    def __init__(self, files: dict[str, Path], names: Iterable[str]) -> None:
        self._files, self._names = files, list(names)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        return _read_tensors(self._files, [name])[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def load_tensors(ckpt_dir: str | os.PathLike, lazy: bool = False) -> tuple[MobileMoEConfig, Mapping[str, torch.Tensor]]:
    """Read and validate a checkpoint directory -> (config, tensors by checkpoint name).

    With ``lazy`` the tensors are read from disk only when accessed, one at a time.
    """
    ckpt = Path(ckpt_dir)
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt}: not a checkpoint directory")
    cfg = MobileMoEConfig.from_json(ckpt / "config.json")
    files = _files(ckpt)
    shapes = _shapes(files)
    if cfg.tie_word_embeddings:  # some exporters also write the tied head; it carries nothing new
        shapes.pop("lm_head.weight", None)
    _validate(cfg, shapes, where=str(ckpt))
    names = expected_tensors(cfg)
    return cfg, (LazyTensors(files, names) if lazy else _read_tensors(files, names))


_ST_DTYPES = {"U8": torch.uint8, "I8": torch.int8, "F16": torch.float16, "BF16": torch.bfloat16,
              "F32": torch.float32, "I32": torch.int32, "I64": torch.int64}


def mmap_tensor(ckpt_dir: str | os.PathLike, name: str) -> torch.Tensor:
    """A read-only, zero-copy view of one tensor straight from the file (pages load on first touch).

    For data read sparsely, e.g. embedding rows looked up by token id: only touched pages become resident.
    """
    import numpy as np

    path = _files(Path(ckpt_dir))[name]
    with open(path, "rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        info = json.loads(fh.read(header_len))[name]
    begin, end = info["data_offsets"]
    dtype = _ST_DTYPES[info["dtype"]]
    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len + begin, shape=(end - begin,))
    import warnings

    with warnings.catch_warnings():  # torch warns that the numpy array is not writable; we never write it
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(raw, dtype=dtype).view(info["shape"])


def dequantized_state_dict(cfg: MobileMoEConfig, tensors: dict[str, torch.Tensor],
                           dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Turn an INT4 checkpoint's tensors into a float ``state_dict`` (the reference decode)."""
    from mobilemoe.quant import dequantize

    if not cfg.is_quantized:
        return dict(tensors)
    group = int(cfg.quantization.get("group_size", 32))
    state = {}
    for spec in tensor_specs(cfg):
        if spec.role in QUANTIZED_ROLES:
            qname, sname = quantized_names(spec)
            state[spec.name] = dequantize(tensors[qname], tensors[sname], group, dtype)
        else:
            state[spec.name] = tensors[spec.name]
    return state


def load_model(ckpt_dir: str | os.PathLike, dtype: torch.dtype | None = None):
    """Load a checkpoint into the reference :class:`MobileMoEForCausalLM`.

    INT4 checkpoints are decoded exactly (``code * scale`` in fp32; bf16 would round the up to 14
    significant bits of a code times an fp16 scale) and, unless ``dtype`` says otherwise, loaded in
    fp32, so the result matches the QAT forward that produced them bit for bit. Parameters are
    assigned from the file tensors, so no second random-initialised copy is ever allocated.
    ``dtype`` casts floating tensors except routers, which stay fp32.
    """
    from mobilemoe.model import MobileMoEForCausalLM

    cfg, tensors = load_tensors(ckpt_dir)
    state = dequantized_state_dict(cfg, tensors, dtype=torch.float32)
    if dtype is None and cfg.is_quantized:
        dtype = torch.float32
    if dtype is not None:
        state = cast_floating(cfg, state, dtype)
    with torch.device("meta"):
        model = MobileMoEForCausalLM(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    model.init_buffers()
    model.config = cfg.replace(quantization=None) if cfg.is_quantized else cfg
    return model
