"""Checkpoints: ``config.json`` + ``model.safetensors`` (sharded with an index above a size).

The name map: :func:`expected_tensors` turns the layout of a config (:mod:`mobilemoe.layout`, whose
names equal the model's ``state_dict`` keys) into the tensor names and shapes a file must hold, in
the BF16/FP32 format or the packed ``mobilemoe-int4-g32`` format of the released QAT checkpoints,
whose naming and shape rules are :func:`mobilemoe.formats.int4_names` and
:func:`~mobilemoe.formats.int4_shapes`. Code that needs the file name of a tensor asks
:func:`quantized_names` (or :func:`expected_tensors`), never assembles it; code that encodes or
decodes one asks :func:`quantized_group_dim` which dim its groups run along (the routed experts'
follows the config's ``expert_quant_group_axis``).

Every file is written atomically (temp file + rename). Loading validates the whole file set first
and reports every missing, unexpected, wrong-shaped or wrong-dtype tensor in one message, then
refuses floating tensors holding NaN/inf (naming them) before any model is built from them.

Dtypes (``shared/specs/mobilemoe-checkpoint.md``): packed INT4 codes are U8 and their scales F16;
every other tensor is a float the model computes in (BF16, F16 or F32).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Iterable, Iterator, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mobilemoe.config import MobileMoEConfig, read_json_file
from mobilemoe.errors import MobileMoEError
from mobilemoe.formats import CODE_DTYPE, SCALE_DTYPE, int4_group_dim, int4_names, int4_shapes
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
    return int4_names(spec.name, stacked_experts=spec.role == "experts")


def quantized_group_dim(cfg: MobileMoEConfig, spec: TensorSpec) -> int:
    """The logical dim a quantized tensor's INT4 groups run along (stored last): -1, or -2 for routed
    experts of a config with ``expert_quant_group_axis`` "in" (:func:`mobilemoe.formats.int4_group_dim`)."""
    return int4_group_dim(spec.role == "experts", cfg.expert_quant_group_axis)


def expected_tensors(cfg: MobileMoEConfig) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape that a checkpoint of this config must contain (format from cfg.quantization)."""
    out: dict[str, tuple[int, ...]] = {}
    for spec in tensor_specs(cfg):
        if cfg.is_quantized and spec.role in QUANTIZED_ROLES:
            qname, sname = quantized_names(spec)
            out[qname], out[sname] = int4_shapes(spec.shape, quantized_group_dim(cfg, spec))
        else:
            out[spec.name] = spec.shape
    return out


FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
CODE_DTYPES = (CODE_DTYPE,)
SCALE_DTYPES = (SCALE_DTYPE,)
# safetensors header dtype names -> torch (names torch lacks stay strings in messages)
_ST_DTYPES = {"U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
              "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
              "BOOL": torch.bool}


def expected_dtypes(cfg: MobileMoEConfig) -> dict[str, tuple[torch.dtype, ...]]:
    """Tensor name -> the dtypes a checkpoint of this config may store it in."""
    out: dict[str, tuple[torch.dtype, ...]] = {}
    for spec in tensor_specs(cfg):
        if cfg.is_quantized and spec.role in QUANTIZED_ROLES:
            qname, sname = quantized_names(spec)
            out[qname], out[sname] = CODE_DTYPES, SCALE_DTYPES
        else:
            out[spec.name] = FLOAT_DTYPES
    return out


def _dtype_name(dtype: torch.dtype | str) -> str:
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")


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
    _validate(cfg, {k: tuple(v.shape) for k, v in tensors.items()}, where=str(out_dir),
              dtypes={k: v.dtype for k, v in tensors.items()})
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
def _validate(cfg: MobileMoEConfig, shapes: dict[str, tuple[int, ...]], where: str,
              dtypes: Mapping[str, torch.dtype | str] | None = None) -> None:
    """Raise one :class:`CheckpointError` listing every missing, unexpected, wrong-shaped and (when
    ``dtypes`` is given: name -> torch dtype or safetensors name) wrong-dtype tensor."""
    expected = expected_tensors(cfg)
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    wrong = [f"{k}: expected {list(expected[k])}, got {list(shapes[k])}"
             for k in expected if k in shapes and tuple(shapes[k]) != tuple(expected[k])]
    wrong_dtype = []
    if dtypes is not None:
        allowed = expected_dtypes(cfg)
        for k in expected:
            if k in dtypes:
                got = _ST_DTYPES.get(dtypes[k], dtypes[k]) if isinstance(dtypes[k], str) else dtypes[k]
                if got not in allowed[k]:
                    names = "/".join(_dtype_name(d) for d in allowed[k])
                    wrong_dtype.append(f"{k}: expected {names}, got {_dtype_name(got)}")
    if missing or unexpected or wrong or wrong_dtype:
        fmt = cfg.quantization["format"] if cfg.is_quantized else "float"
        parts = [f"{where}: tensors do not match the config ({fmt} format)"]
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong),
                             ("wrong dtype", wrong_dtype)):
            if items:
                shown = "; ".join(items[:MAX_LISTED])
                more = f" (+{len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else ""
                parts.append(f"{label} ({len(items)}): {shown}{more}")
        raise CheckpointError("\n  ".join(parts))


def is_finite(t: torch.Tensor) -> bool:
    """True unless a floating tensor holds NaN or inf (checked in chunks: no full-size bool copy)."""
    if not t.is_floating_point():
        return True
    return all(bool(torch.isfinite(chunk).all()) for chunk in t.detach().reshape(-1).split(1 << 22))


def check_finite(tensors: Mapping[str, torch.Tensor], where: str) -> None:
    """Refuse NaN/inf weights, naming the tensors: they would load and generate garbage silently."""
    bad = [name for name, t in tensors.items() if not is_finite(t)]
    if bad:
        shown = ", ".join(bad[:MAX_LISTED]) + (f" (+{len(bad) - MAX_LISTED} more)" if len(bad) > MAX_LISTED else "")
        raise CheckpointError(f"{where}: non-finite values (NaN/inf) in {len(bad)} tensor(s): {shown}")


def index_files(index: Path, error: type[Exception] | None = None) -> dict[str, Path]:
    """A safetensors index's ``weight_map`` -> tensor name -> shard path, checked: a JSON object whose
    shards are plain file names inside the index's directory (no absolute path, no ``..``)."""
    error = error or CheckpointError
    data = read_json_file(index, error)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and v for k, v in weight_map.items()):
        raise error(f"{index}: not a valid safetensors index (expected a 'weight_map' object of "
                    f"tensor name -> shard file name)")
    for name, fname in weight_map.items():
        parts = PurePosixPath(fname.replace("\\", "/")).parts
        if PurePosixPath(fname).is_absolute() or PureWindowsPath(fname).is_absolute() or ".." in parts:
            raise error(f"{index}: tensor {name!r} names shard {fname!r} outside the checkpoint directory")
    return {name: index.parent / fname for name, fname in weight_map.items()}


def _files(ckpt: Path) -> dict[str, Path]:
    """tensor name -> file that holds it (index if sharded)."""
    index = ckpt / INDEX_FILE
    if index.exists():
        return index_files(index)
    single = ckpt / SINGLE_FILE
    if not single.exists():
        raise CheckpointError(f"{ckpt}: no {SINGLE_FILE} or {INDEX_FILE} found")
    return {name: single for name in _read_names(single)}


@contextlib.contextmanager
def _open(path: Path) -> Iterator:
    """safe_open with every failure turned into a CheckpointError naming the file."""
    if not path.is_file():
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


def _header(files: dict[str, Path]) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """(shapes, safetensors dtype names) of the tensors each file actually holds (a name the index
    misplaces counts as missing). Reads headers only."""
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, str] = {}
    for path in sorted(set(files.values())):
        with _open(path) as f:
            for name in f.keys():
                if files.get(name) == path:
                    info = f.get_slice(name)
                    shapes[name], dtypes[name] = tuple(info.get_shape()), info.get_dtype()
    return shapes, dtypes


def _shapes(files: dict[str, Path]) -> dict[str, tuple[int, ...]]:
    """Shapes of the tensors each file actually holds (see :func:`_header`)."""
    return _header(files)[0]


class LazyTensors(Mapping):
    """Checkpoint tensors read one at a time on access (nothing is held): for streaming loaders."""

    def __init__(self, files: dict[str, Path], names: Iterable[str]) -> None:
        self._files, self._names = files, list(names)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        tensor = _read_tensors(self._files, [name])[name]
        check_finite({name: tensor}, str(self._files[name]))
        return tensor

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
    shapes, dtypes = _header(files)
    if cfg.tie_word_embeddings:  # some exporters also write the tied head; it carries nothing new
        shapes.pop("lm_head.weight", None)
    _validate(cfg, shapes, where=str(ckpt), dtypes=dtypes)
    names = expected_tensors(cfg)
    if lazy:
        return cfg, LazyTensors(files, names)  # each tensor is checked finite when read
    tensors = _read_tensors(files, names)
    check_finite(tensors, str(ckpt))
    return cfg, tensors


def mmap_tensor(ckpt_dir: str | os.PathLike, name: str) -> torch.Tensor:
    """A read-only, zero-copy view of one tensor straight from the file (pages load on first touch).

    For data read sparsely, e.g. embedding rows looked up by token id: only touched pages become resident.
    """
    import numpy as np

    path = _files(Path(ckpt_dir))[name]
    try:
        with open(path, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            if header_len > 100 * 1024**2:  # safetensors' own cap on a header
                raise ValueError(f"header length {header_len}")
            info = json.loads(fh.read(header_len))[name]
        begin, end = info["data_offsets"]
        dtype = _ST_DTYPES[info["dtype"]]
        raw = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len + begin, shape=(end - begin,))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file, it may be truncated or "
                              f"corrupted ({type(exc).__name__}: {exc})") from None
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
    state = {}
    for spec in tensor_specs(cfg):
        if spec.role in QUANTIZED_ROLES:
            qname, sname = quantized_names(spec)
            state[spec.name] = dequantize(tensors[qname], tensors[sname], dtype=dtype,
                                          group_dim=quantized_group_dim(cfg, spec))
        else:
            state[spec.name] = tensors[spec.name]
    return state


def _common_dtype(cfg: MobileMoEConfig, state: Mapping[str, torch.Tensor]) -> torch.dtype | None:
    """None when every non-router tensor shares one dtype, else fp32 (holds bf16 and fp16 exactly)."""
    routers = {s.name for s in tensor_specs(cfg) if s.role == "router"}
    found = {v.dtype for k, v in state.items() if k not in routers and v.is_floating_point()}
    return torch.float32 if len(found) > 1 else None


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
    if dtype is None:  # a float file mixing dtypes (routers aside) loads in the widest one: exact, no mixed matmuls
        dtype = _common_dtype(cfg, state)
    if dtype is not None:
        state = cast_floating(cfg, state, dtype)
    with torch.device("meta"):
        model = MobileMoEForCausalLM(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    model.init_buffers()
    model.config = cfg.replace(quantization=None) if cfg.is_quantized else cfg
    return model
