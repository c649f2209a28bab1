"""Tiny checkpoints for the export tests (built once per session); makes gguf_helpers importable
(pytest runs with --import-mode=importlib)."""

import sys
from pathlib import Path

import pytest
import torch

from mobilemoe.checkpoint import save_checkpoint
from mobilemoe.config import preset
from mobilemoe.model import MobileMoEForCausalLM
from mobilemoe.quant import quantize_checkpoint

LLAMA3_SMALL = {"rope_type": "llama3", "factor": 16.0, "original_max_position_embeddings": 64,
                "low_freq_factor": 1.0, "high_freq_factor": 1.0}
PROMPT = [1, 5, 9, 100, 3, 77, 200, 13, 42, 8]

sys.path.insert(0, str(Path(__file__).parent))


def build(path, seed=0, **overrides):
    """Save a random tiny-moe checkpoint with non-trivial norms and selection biases."""
    cfg = preset("tiny-moe", max_position_embeddings=128, **overrides)
    model = MobileMoEForCausalLM(cfg).eval()
    model.reset_parameters(seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("expert_bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
            elif name.endswith("norm.weight"):
                p.copy_(1 + torch.randn(p.shape, generator=gen) * 0.1)
    save_checkpoint(model, path)
    return path


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory):
    """name -> checkpoint dir: 'float' (llama3 scaling + a NoPE layer), 'int4' (its INT4 conversion),
    'plain' (defaults), 'lead_dense' (a leading dense layer)."""
    root = tmp_path_factory.mktemp("export_ckpts")
    out = {
        "float": build(root / "float", rope_scaling=LLAMA3_SMALL, no_rope_layers=[1, 0, 1, 1]),
        "plain": build(root / "plain", seed=3),
        "lead_dense": build(root / "lead_dense", seed=4, num_hidden_layers=2, interleave_moe_layer_step=2),
    }
    quantize_checkpoint(out["float"], root / "int4")
    out["int4"] = root / "int4"
    return out


@pytest.fixture(scope="session")
def prompt():
    return list(PROMPT)


@pytest.fixture(scope="session")
def small_ckpt(tmp_path_factory):
    """2 layers, 4 experts (llama3 scaling, a NoPE layer): the smallest model that still routes;
    keeps ExecuTorch lowering fast on 2 cores."""
    root = tmp_path_factory.mktemp("export_small")
    return build(root / "ck", seed=5, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2,
                 rope_scaling=LLAMA3_SMALL, no_rope_layers=[1, 0])


@pytest.fixture(scope="session")
def build_ckpt():
    """The :func:`build` helper (test modules cannot import this conftest by name)."""
    return build
