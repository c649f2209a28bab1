"""MobileMoE <-> Hugging Face directories.

:func:`export_hf` writes a directory that ``transformers.AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)`` loads with no mobilemoe installed:

* ``config.json``: the MobileMoE contract (:meth:`mobilemoe.config.MobileMoEConfig.to_dict`) plus
  ``auto_map`` pointing at the two code files below;
* ``model.safetensors``: the float tensors under the checkpoint names (which equal the module names of
  the remote code). INT4 checkpoints are decoded exactly (``code * scale``) and written as float32
  (bfloat16 would round the decoded values), so the ``quantization`` block is dropped;
* the remote code (:func:`remote_code`): the package's own ``model.py`` and ``moe.py`` and the
  modules they import (``config.py``, ...), each a copy whose only change is the mechanical import
  rewrite :func:`ship_source`, plus the thin transformers wrappers ``configuration_mobilemoe.py`` and
  ``modeling_mobilemoe.py`` from ``mobilemoe/export/hf_remote``;
* ``generation_config.json``, and ``tokenizer.json`` (+ ``tokenizer_config.json``) when the
  checkpoint has one.

:func:`import_hf` reads such a directory -- or one in the released ``facebook/MobileMoE-*`` layout
(``model_type: mobilemoe``, INT4 ``qweight``/``weight_scale`` names, or BF16 names) -- into a
mobilemoe checkpoint directory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from mobilemoe.config import MobileMoEConfig
from mobilemoe.export.common import ExportError

REMOTE_DIR = Path(__file__).parent / "hf_remote"
REMOTE_FILES = ("configuration_mobilemoe.py", "modeling_mobilemoe.py")
PACKAGE_DIR = Path(__file__).parent.parent
SHIPPED_ROOTS = ("model.py",)  # the forward; everything it imports from mobilemoe ships with it
_PACKAGE_IMPORT = re.compile(r"^(\s*)from mobilemoe\.(\w+) import ", re.MULTILINE)
_ANY_PACKAGE_IMPORT = re.compile(r"^\s*(?:from|import)\s+mobilemoe\b.*$", re.MULTILINE)
AUTO_MAP = {"AutoConfig": "configuration_mobilemoe.MobileMoEConfig",
            "AutoModelForCausalLM": "modeling_mobilemoe.MobileMoEForCausalLM"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
IMPORTED_FILES = (*TOKENIZER_FILES, "generation_config.json", "chat_template.jinja")
# keys written by transformers or this exporter that are not part of the MobileMoE contract
_HF_ONLY_KEYS = ("auto_map", "transformers_version", "mobilemoe_rope_scaling", "dtype", "output_attentions",
                 "output_hidden_states", "return_dict", "use_cache")


def export_hf(ckpt: str | os.PathLike, out: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Write the HF directory ``out`` from a mobilemoe checkpoint directory. ``dtype`` casts floating
    tensors (routers stay fp32); default: the checkpoint's own dtype, fp32 for INT4 checkpoints."""
    from safetensors.torch import save_file

    from mobilemoe.checkpoint import dequantized_state_dict, load_tensors
    from mobilemoe.layout import tensor_specs
    from mobilemoe.utils import atomic_path, atomic_write_text

    ckpt, out = Path(ckpt), Path(out)
    code = remote_code()  # before any output is written: a source that cannot ship fails here
    cfg, tensors = load_tensors(ckpt)
    state = dequantized_state_dict(cfg, tensors, dtype=torch.float32)
    if dtype is None and cfg.is_quantized:
        dtype = torch.float32
    routers = {s.name for s in tensor_specs(cfg) if s.role == "router"}
    if dtype is not None:
        state = {k: (v if k in routers or not v.is_floating_point() else v.to(dtype)) for k, v in state.items()}
    first = state["model.embed_tokens.weight"].dtype
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "model.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
    hf_cfg = cfg.replace(quantization=None, torch_dtype=str(first).removeprefix("torch.")) if cfg.is_quantized \
        else cfg.replace(torch_dtype=str(first).removeprefix("torch."))
    data = hf_cfg.to_dict()
    data["auto_map"] = dict(AUTO_MAP)
    atomic_write_text(out / "config.json", json.dumps(data, indent=2) + "\n")
    for name, text in code.items():
        atomic_write_text(out / name, text)
    gen = {"_from_model_config": True}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(cfg, key) is not None:
            gen[key] = getattr(cfg, key)
    if not (ckpt / "generation_config.json").exists():  # an imported checkpoint keeps its own (copied below)
        atomic_write_text(out / "generation_config.json", json.dumps(gen, indent=2) + "\n")
    for name in IMPORTED_FILES:
        if (ckpt / name).exists():
            shutil.copyfile(ckpt / name, out / name)
    if (ckpt / "tokenizer.json").exists() and not (ckpt / "tokenizer_config.json").exists():
        atomic_write_text(out / "tokenizer_config.json", json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.max_position_embeddings},
            indent=2) + "\n")
    return out


def ship_source(text: str) -> str:
    """A package module as the remote code ships it: ``from mobilemoe.X import`` becomes
    ``from .X import`` (transformers copies the files a module imports relatively), nothing else."""
    return _PACKAGE_IMPORT.sub(r"\1from .\2 import ", text)


def remote_code() -> dict[str, str]:
    """File name -> text of the remote code: :data:`SHIPPED_ROOTS` and every package module they
    import (recursively), through :func:`ship_source`, then the transformers wrappers."""
    files: dict[str, str] = {}
    todo = list(SHIPPED_ROOTS)
    while todo:
        name = todo.pop()
        if name in files:
            continue
        files[name] = ship_source((PACKAGE_DIR / name).read_text(encoding="utf-8"))
        left = _ANY_PACKAGE_IMPORT.search(files[name])  # e.g. `import mobilemoe.x` or a subpackage
        if left:
            raise ExportError(f"mobilemoe/{name}: cannot ship '{left.group(0).strip()}' as remote code "
                              f"(only 'from mobilemoe.NAME import' of a top-level module)")
        todo += [f"{m}.py" for m in re.findall(r"^\s*from \.(\w+) import ", files[name], re.MULTILINE)]
    for name in REMOTE_FILES:
        files[name] = (REMOTE_DIR / name).read_text(encoding="utf-8")
    return files


def _hf_files(src: Path) -> dict[str, Path]:
    """tensor name -> file: from a checked index (shards inside ``src`` only) or the single file."""
    from mobilemoe.checkpoint import _read_names, index_files

    index = src / "model.safetensors.index.json"
    if index.exists():
        return index_files(index, ExportError)
    single = src / "model.safetensors"
    if not single.exists():
        raise ExportError(f"{src}: no model.safetensors or model.safetensors.index.json")
    return {k: single for k in _read_names(single)}


def import_hf(src: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Read a Hugging Face MobileMoE directory (ours, or the released layout) into a mobilemoe
    checkpoint directory ``out`` (INT4 stays INT4, float stays float). Validated on the way: config,
    index, every header, every tensor's shape and dtype, and finite values, each failure one error
    naming the file."""
    from mobilemoe.checkpoint import _header, _read_tensors, _validate, check_finite, save_tensors
    from mobilemoe.config import read_json_file

    src, out = Path(src), Path(out)
    if not (src / "config.json").exists():
        raise ExportError(f"{src}: no config.json")
    data = read_json_file(src / "config.json", ExportError)
    if not isinstance(data, dict):
        raise ExportError(f"{src / 'config.json'}: expected a JSON object, got {type(data).__name__}")
    if data.get("model_type") != "mobilemoe":
        raise ExportError(f"{src}: model_type {data.get('model_type')!r} is not 'mobilemoe'")
    if data.get("rope_scaling") is None and data.get("mobilemoe_rope_scaling"):
        data["rope_scaling"] = data["mobilemoe_rope_scaling"]
    for key in _HF_ONLY_KEYS:
        data.pop(key, None)
    cfg = MobileMoEConfig.from_dict(data, source=str(src / "config.json"))
    files = _hf_files(src)
    if cfg.tie_word_embeddings:
        files.pop("lm_head.weight", None)
    shapes, dtypes = _header(files)  # headers only: a mismatch is reported before any data is read
    _validate(cfg, shapes, where=str(src), dtypes=dtypes)
    tensors = _read_tensors(files, shapes)
    check_finite(tensors, str(src))
    save_tensors(tensors, cfg, out)
    # the tokenizer, its chat template and the generation config (eos_token_id list) travel along:
    # chat and generation read them (mobilemoe.data.chat_format)
    for name in IMPORTED_FILES:
        if (src / name).exists():
            shutil.copyfile(src / name, out / name)
    return out
