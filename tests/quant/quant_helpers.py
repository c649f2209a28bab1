"""Helpers for the INT4 / QAT tests: tiny MoE configs and models (CPU, a few ms each)."""

from __future__ import annotations

import torch

from mobilemoe.config import preset
from mobilemoe.model import MobileMoEForCausalLM


def tiny_cfg(**overrides):
    base = dict(num_hidden_layers=2, vocab_size=256, num_local_experts=8, num_experts_per_tok=2)
    base.update(overrides)
    return preset("tiny-moe", **base)


def tiny_model(seed: int = 0, **overrides) -> MobileMoEForCausalLM:
    model = MobileMoEForCausalLM(tiny_cfg(**overrides))
    model.reset_parameters(seed=seed)
    return model


def token_ids(vocab: int = 256, shape=(2, 12), seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))
