"""Logits of a GGUF in llama.cpp and of a checkpoint in the reference model, for the GGUF tests."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from mobilemoe.checkpoint import load_model


def llama_logits(path, ids, n_ctx=64):
    """llama.cpp in a child process: a crash there fails the test with one line, not pytest."""
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed")
    from mobilemoe.export.llamacpp_logits import llama_logits as run

    return run(path, ids, n_ctx=n_ctx)


def ref_logits(ckpt, ids):
    with torch.no_grad():
        return load_model(ckpt).eval()(torch.tensor([ids])).logits[0].float().numpy()
