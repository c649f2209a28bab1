"""Random-weight INT4 checkpoints of any config, generated directly in the packed format.

For speed benchmarks of the real presets: no float copy is ever materialised (a 5B-parameter L
model would need 20 GB in fp32), codes are uniform random bytes and scales a small constant with
random signs, so activations stay finite through the network.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from mobilemoe.checkpoint import expected_tensors, quantized_names, save_tensors
from mobilemoe.config import INT4_QUANTIZATION_BLOCK, MobileMoEConfig
from mobilemoe.layout import QUANTIZED_ROLES, tensor_specs

SCALE = 0.004


def random_int4_tensors(cfg: MobileMoEConfig, seed: int = 0) -> tuple[MobileMoEConfig, dict[str, torch.Tensor]]:
    qcfg = cfg.replace(quantization=dict(INT4_QUANTIZATION_BLOCK))
    shapes = expected_tensors(qcfg)
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for spec in tensor_specs(qcfg):
        if spec.role in QUANTIZED_ROLES:
            qname, sname = quantized_names(spec)
            tensors[qname] = torch.randint(0, 256, shapes[qname], dtype=torch.uint8, generator=gen)
            sign = torch.randint(0, 2, shapes[sname], generator=gen) * 2 - 1
            tensors[sname] = (sign * SCALE).to(torch.float16)
        elif spec.role == "router":
            tensors[spec.name] = torch.randn(spec.shape, generator=gen) * 0.02
        elif spec.role == "norm":
            tensors[spec.name] = torch.ones(spec.shape, dtype=torch.bfloat16)
        else:  # expert_bias, attention biases
            tensors[spec.name] = torch.zeros(spec.shape, dtype=torch.bfloat16)
    return qcfg, tensors


def write_random_int4_checkpoint(cfg: MobileMoEConfig, out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write (once) a random INT4 checkpoint; an existing one with the same config is reused."""
    out = Path(out_dir)
    qcfg = cfg.replace(quantization=dict(INT4_QUANTIZATION_BLOCK))
    if (out / "config.json").exists() and MobileMoEConfig.from_json(out / "config.json").to_dict() == qcfg.to_dict():
        return out
    qcfg, tensors = random_int4_tensors(cfg, seed)
    return save_tensors(tensors, qcfg, out)
