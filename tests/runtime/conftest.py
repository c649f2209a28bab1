"""Shared fixtures of the runtime tests: seeded random INT4 checkpoints of the tiny presets."""

import pytest

from mobilemoe.checkpoint import save_checkpoint
from mobilemoe.config import preset
from mobilemoe.model import MobileMoEForCausalLM
from mobilemoe.quant import quantize_checkpoint


@pytest.fixture(scope="session")
def make_int4_checkpoint(tmp_path_factory):
    """``make(name, seed, **overrides)``: a float and an INT4 checkpoint of a seeded random preset
    (max 64 positions) in a fresh directory; returns the INT4 directory."""

    def make(name: str, seed: int, **overrides):
        root = tmp_path_factory.mktemp(name)
        model = MobileMoEForCausalLM(preset(name, max_position_embeddings=64, **overrides))
        model.reset_parameters(seed=seed)
        save_checkpoint(model, root / "float")
        quantize_checkpoint(root / "float", root / "int4")
        return root / "int4"

    return make


@pytest.fixture(scope="module")
def int4_ckpt(make_int4_checkpoint):
    return make_int4_checkpoint("tiny-moe", seed=1)
