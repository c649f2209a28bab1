"""Shared helpers for the trainer tests: a micro MoE config and a few KB of text tokens."""

from __future__ import annotations

import numpy as np
import torch

from mobilemoe.config import preset
from mobilemoe.model import MobileMoEForCausalLM

TEXT = (
    "The quick brown fox jumps over the lazy dog. " * 3
    + "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
    "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles. "
    + "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n" * 4
) * 8  # ~5 KB


def micro_config(**overrides):
    base = dict(vocab_size=257, num_hidden_layers=2, hidden_size=64, head_dim=16, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=32, intermediate_size_mlp=64, num_local_experts=8,
                num_experts_per_tok=2, max_position_embeddings=128)
    base.update(overrides)
    return preset("tiny-moe", **base)


def micro_model(seed: int = 0, **overrides) -> MobileMoEForCausalLM:
    torch.manual_seed(seed)
    model = MobileMoEForCausalLM(micro_config(**overrides))
    model.reset_parameters(seed=seed)
    return model


def text_token_array() -> np.ndarray:
    return np.frombuffer(TEXT.encode("utf-8"), dtype=np.uint8).astype(np.int64)
