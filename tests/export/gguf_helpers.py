"""Logits of a GGUF in llama.cpp and of a checkpoint in the reference model, for the GGUF tests."""

from __future__ import annotations

import functools
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


def q8_0_round(x: torch.Tensor, flip_within: float = 0.0) -> torch.Tensor:
    """``x`` as llama.cpp's x86 CPU backend feeds it to a Q4_0 / Q8_0 matmul: quantize_row_q8_0 per
    block of 32 along the last axis (amax, id = 127 / amax in fp32, q = round-half-even(x * id), scale
    d = amax / 127 stored as fp16), dequantized back: q * fp16(d).

    ``flip_within`` > 0 rounds the other way every element whose ``x * id`` lies within
    ``flip_within * max(|x * id|, 1)`` of a half step: the roundings that float-rounding differences
    upstream (fp64 here, fp32 in llama.cpp) can decide either way."""
    shape, dtype = x.shape, x.dtype
    b = x.float().reshape(*shape[:-1], shape[-1] // 32, 32)
    amax = b.abs().amax(-1, keepdim=True)
    # A tensor divided by a tensor: ``127.0 / amax`` would be ``amax.reciprocal() * 127`` (two
    # roundings), 1 ulp off llama.cpp's ``127.f / amax`` for a quarter of the blocks, which flips
    # the rounding of an element sitting on a half step.
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    v = b * inv
    q = torch.round(v)
    if flip_within > 0:
        near = ((v - v.floor()) - 0.5).abs() < flip_within * v.abs().clamp(min=1.0)
        q = torch.where(near, torch.where(q > v, q - 1, q + 1), q)
    d = (amax / 127.0).half().float()
    return (q * d).reshape(shape).to(dtype)


def ref_logits_llamacpp_rounding(ckpt, ids, inputs_of=("",), flip_within=0.0):
    """The exact INT4 forward (fp64) with llama.cpp's one deliberate rounding: the input of every
    matmul whose module name contains one of ``inputs_of`` (attention and FFN projections, shared
    expert; ``"experts"`` for the routed experts' two matmuls; ``"head"`` for the output head) goes
    through :func:`q8_0_round` (the fp32 routers never do). With every quantized matmul covered, what
    is left between this and llama.cpp is float rounding, and the roundings it decides (see
    ``flip_within`` of :func:`q8_0_round`)."""
    from mobilemoe.moe import MoEBlock

    rnd = functools.partial(q8_0_round, flip_within=flip_within)
    model = load_model(ckpt).eval().double()
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and not name.endswith(".router") and any(p in name for p in inputs_of):
            hooks.append(mod.register_forward_pre_hook(lambda m, args: (rnd(args[0]),) + args[1:]))
        if isinstance(mod, MoEBlock) and any(p in ("", "experts") for p in inputs_of):
            mod.experts.activation = rnd
    if any(p in ("", "head") for p in inputs_of):
        hooks.append(model.model.norm.register_forward_hook(lambda m, args, out: rnd(out)))
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()
