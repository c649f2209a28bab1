"""Float (BF16/FP32) state dict or checkpoint -> the released ``mobilemoe-int4-g32`` INT4 checkpoint.

The output has exactly the layout of ``facebook/MobileMoE-*-QAT`` (``shared/specs/mobilemoe-checkpoint.md``):

* embedding / linear / lm_head / routed-expert weights -> U8 packed codes + F16 scales, named by
  :func:`mobilemoe.checkpoint.quantized_names`, grouped along the last logical axis
  (``in`` of [out, in]; ``out`` of [E, in, out]), or, for routed experts of a config with
  ``expert_quant_group_axis: "in"``, along ``in`` (stored [E, out, in]; the block then records it);
* routers -> F32 (never quantized); norms, expert_bias (and attention biases, if any) -> BF16;
* ``config.json`` with ``quantization`` = :func:`mobilemoe.formats.int4_quantization_block` of the
  config's expert axis (for ``out``, the released block verbatim) and ``torch_dtype`` "bfloat16".

Codes come from :func:`mobilemoe.quant.int4.quantize`, the function QAT fake-quantizes with
(:mod:`mobilemoe.quant.qat`), so a QAT-trained model converts to exactly the weights it trained with.
:func:`quantize_checkpoint` reads one source tensor at a time (only the INT4 output, about a quarter
of a BF16 copy, is held in memory) and writes atomically through :func:`mobilemoe.checkpoint.save_tensors`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from mobilemoe.checkpoint import (
    CheckpointError,
    _files,
    _header,
    _validate,
    expected_tensors,
    is_finite,
    quantized_group_dim,
    quantized_names,
    save_tensors,
)
from mobilemoe.config import INT4_QUANTIZATION_BLOCK, MobileMoEConfig
from mobilemoe.errors import MobileMoEError
from mobilemoe.layout import QUANTIZED_ROLES, TensorSpec, tensor_specs
from mobilemoe.quant.int4 import quantize

from mobilemoe.formats import GROUP_SIZE, INT4_SUFFIXES, int4_quantization_block


class QuantizeError(MobileMoEError, ValueError):
    """The input to the INT4 converter is not a float checkpoint/state dict of its config."""


@dataclass
class QuantizeReport:
    src: str
    out: str
    format: str
    bytes_before: int  # safetensors file bytes of the source
    bytes_after: int  # safetensors file bytes written
    tensors_before: int
    tensors_after: int
    quantized_tensors: int  # float tensors turned into (codes, scales) pairs
    params: int

    @property
    def ratio(self) -> float:
        return self.bytes_before / self.bytes_after if self.bytes_after else float("nan")

    def to_dict(self) -> dict:
        return {**asdict(self), "ratio": round(self.ratio, 4)}


CARRIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                 "chat_template.jinja")


def int4_config(cfg: MobileMoEConfig) -> MobileMoEConfig:
    """The config of the INT4 checkpoint of a float config (validated: packed axes must split by 32)."""
    if cfg.is_quantized:
        raise QuantizeError(f"config is already quantized (quantization.format "
                            f"{cfg.quantization.get('format')!r}); expected a float config")
    return cfg.replace(quantization=int4_quantization_block(cfg.expert_quant_group_axis), torch_dtype="bfloat16")


def _looks_int4(names) -> list[str]:
    return [n for n in names if n.endswith(INT4_SUFFIXES)]


def _int4_layout_error(where: str, names: list[str]) -> QuantizeError:
    shown = ", ".join(names[:3]) + (" ..." if len(names) > 3 else "")
    return QuantizeError(f"{where}: holds tensors in the packed {INT4_QUANTIZATION_BLOCK['format']} INT4 layout "
                         f"({shown}) but its config has no quantization block; it is already quantized, "
                         f"expected float (BF16/FP32) weights")


def convert_tensor(spec: TensorSpec, t: torch.Tensor, group_size: int = GROUP_SIZE,
                   group_dim: int = -1) -> dict[str, torch.Tensor]:
    """One float tensor -> its tensors in the INT4 checkpoint (by checkpoint name); ``group_dim``:
    :func:`mobilemoe.checkpoint.quantized_group_dim` of the tensor."""
    t = t.detach().cpu()
    if not t.is_floating_point():
        raise QuantizeError(f"{spec.name}: expected a floating-point tensor, got {t.dtype}")
    # Every role, not only the quantized ones: a NaN router or an inf norm would be copied into
    # an INT4 checkpoint that loads and generates garbage.
    if not is_finite(t):
        raise QuantizeError(f"{spec.name}: has non-finite values (NaN/inf); cannot quantize")
    if spec.role in QUANTIZED_ROLES:
        try:
            codes, scales = quantize(t, group_size, group_dim)  # refuses a scale that overflows fp16
        except ValueError as exc:
            raise QuantizeError(f"{spec.name}: {str(exc).removeprefix('quantize: ')}") from None
        qname, sname = quantized_names(spec)
        return {qname: codes, sname: scales}
    out = t.to(torch.float32 if spec.role == "router" else torch.bfloat16)  # norms, biases: BF16 as released
    if not is_finite(out):  # e.g. a float64 value beyond the bf16 range
        raise QuantizeError(f"{spec.name}: a value overflows {out.dtype}")
    return {spec.name: out}


def quantize_state_dict(cfg: MobileMoEConfig, state: dict[str, torch.Tensor]
                        ) -> tuple[MobileMoEConfig, dict[str, torch.Tensor]]:
    """A float ``state_dict`` of ``cfg`` -> (INT4 config, tensors of the released INT4 checkpoint).

    ``state`` may be a model's ``state_dict()`` (a QAT model's too: its names are unchanged).
    """
    if cfg.is_quantized:
        raise QuantizeError(f"state dict config is already quantized (quantization.format "
                            f"{cfg.quantization.get('format')!r}); expected a float model")
    int4 = _looks_int4(state)
    if int4:
        raise _int4_layout_error("state dict", int4)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    if cfg.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    _validate(cfg, shapes, where="state dict")
    qcfg = int4_config(cfg)
    group = int(qcfg.quantization["group_size"])
    out: dict[str, torch.Tensor] = {}
    for spec in tensor_specs(cfg):
        out.update(convert_tensor(spec, state[spec.name], group, quantized_group_dim(cfg, spec)))
    return qcfg, out


def _safetensors_bytes(ckpt: Path) -> int:
    return sum(p.stat().st_size for p in set(_files(ckpt).values()))


def quantize_checkpoint(src_dir: str | os.PathLike, out_dir: str | os.PathLike,
                        overwrite: bool = False) -> QuantizeReport:
    """Quantize a float checkpoint directory into an INT4 one, streaming one tensor at a time.

    Refuses an INT4 source (naming its format), ``out_dir == src_dir``, and an ``out_dir`` that
    already holds a checkpoint unless ``overwrite``.
    """
    src, out = Path(src_dir), Path(out_dir)
    if not src.is_dir():
        raise QuantizeError(f"{src}: not a checkpoint directory")
    cfg = MobileMoEConfig.from_json(src / "config.json")
    if cfg.is_quantized:
        raise QuantizeError(f"{src}: already an INT4 checkpoint (quantization.format "
                            f"{cfg.quantization.get('format')!r}); quantize expects a float (BF16/FP32) checkpoint")
    files = _files(src)
    shapes, dtypes = _header(files)
    int4 = _looks_int4(shapes)
    if int4:
        raise _int4_layout_error(str(src), int4)
    if cfg.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    _validate(cfg, shapes, where=str(src), dtypes=dtypes)
    if out.exists() and out.resolve() == src.resolve():
        raise QuantizeError(f"{out}: output directory is the source checkpoint; choose another directory")
    if (out / "config.json").exists() and not overwrite:
        raise QuantizeError(f"{out}: already holds a checkpoint (config.json); remove it or pass --force")
    qcfg = int4_config(cfg)
    group = int(qcfg.quantization["group_size"])

    tensors: dict[str, torch.Tensor] = {}
    n_quantized = params = 0
    with contextlib.ExitStack() as stack:
        handles = {}
        for spec in tensor_specs(cfg):
            path = files[spec.name]
            if path not in handles:
                try:
                    handles[path] = stack.enter_context(safe_open(str(path), framework="pt"))
                except Exception as exc:
                    raise CheckpointError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None
            try:
                t = handles[path].get_tensor(spec.name)
            except Exception as exc:
                raise CheckpointError(f"{path}: cannot read {spec.name!r} ({type(exc).__name__}: {exc})") from None
            try:
                tensors.update(convert_tensor(spec, t, group, quantized_group_dim(cfg, spec)))
            except QuantizeError as exc:  # name the file too; nothing has been written yet
                raise QuantizeError(f"{path}: {exc}") from None
            n_quantized += spec.role in QUANTIZED_ROLES
            params += t.numel()
            del t
    save_tensors(tensors, qcfg, out)
    for extra in CARRIED_FILES:  # the tokenizer travels with the weights
        if (src / extra).exists():
            shutil.copyfile(src / extra, out / extra)
    return QuantizeReport(src=str(src), out=str(out), format=qcfg.quantization["format"],
                          bytes_before=_safetensors_bytes(src), bytes_after=_safetensors_bytes(out),
                          tensors_before=len(shapes), tensors_after=len(expected_tensors(qcfg)),
                          quantized_tensors=n_quantized, params=params)
