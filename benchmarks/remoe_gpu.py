"""ReMoE router-only training throughput and peak memory on a random-weight model of a real MoE shape.

The model is built OFFLINE from its published config with transformers (random weights: speed and
memory do not depend on the values): ``olmoe`` = OLMoE-1B-7B (16 layers, d 2048, 64 experts top-8),
``qwen2_moe`` = Qwen1.5-MoE-A2.7B (24 layers, d 2048, 60 experts top-4 + shared). It trains through
:class:`mobilemoe.remoe.train.RemoeTrainer` (only the routers require grad and have AdamW state) on
random tokens, and reports tokens/s, peak memory (CUDA: peak allocated; CPU: peak RSS), the number
of trainable parameters and optimizer-state tensors.

``--smoke`` shrinks the shape (same family, same code path; seconds on a CPU). ``--device cuda``
without a GPU is refused.

Usage: python benchmarks/remoe_gpu.py [--family olmoe|qwen2_moe] [--device auto|cpu|cuda]
       [--dtype bfloat16|float32] [--seq-len 2048] [--batch 1] [--grad-accum 1] [--steps 5] [--warmup 1]
       [--no-gradient-checkpointing] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from mobilemoe.remoe.adapters import HFAdapter
from mobilemoe.remoe.data import batches
from mobilemoe.remoe.losses import LossWeights
from mobilemoe.remoe.train import DTYPES, RemoeTrainConfig, RemoeTrainer
from mobilemoe.train.gpu import peak_memory_bytes, reset_peak_memory, resolve_device, synchronize

# published shapes (config.json of allenai/OLMoE-1B-7B-0924 and Qwen/Qwen1.5-MoE-A2.7B)
SHAPES = {
    "olmoe": dict(vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
                  num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
                  max_position_embeddings=4096, rope_theta=10000.0, clip_qkv=None),
    "qwen2_moe": dict(vocab_size=151936, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                      num_attention_heads=16, num_key_value_heads=16, num_experts=60, num_experts_per_tok=4,
                      moe_intermediate_size=1408, shared_expert_intermediate_size=5632, decoder_sparse_step=1,
                      max_position_embeddings=8192, rope_theta=1000000.0),
}
SMOKE = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, max_position_embeddings=256,
             moe_intermediate_size=32, shared_expert_intermediate_size=32)


def build(family: str, smoke: bool, dtype: torch.dtype, device: torch.device):
    """A random-weight transformers model of ``family``'s shape, created directly in ``dtype`` on ``device``."""
    import transformers as tf

    shape = dict(SHAPES[family])
    if smoke:
        shape.update({k: v for k, v in SMOKE.items() if k in shape})
    cls = {"olmoe": tf.OlmoeConfig, "qwen2_moe": tf.Qwen2MoeConfig}[family]
    cfg = cls(**shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = tf.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.eval()
    return model


def run(args) -> dict:
    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype]
    model = build(args.family, args.smoke, dtype, device)
    adapter = HFAdapter(model)
    vocab = model.config.vocab_size
    n_tokens = (args.steps + args.warmup + 2) * args.grad_accum * args.batch * (args.seq_len + 1) + 1
    tokens = np.random.default_rng(0).integers(0, vocab, size=n_tokens, dtype=np.int64)
    cfg = RemoeTrainConfig(steps=args.steps + args.warmup, lr=5e-5, warmup_steps=0, grad_accum=args.grad_accum,
                           batch_size=args.batch, seq_len=args.seq_len, device=args.device, dtype=args.dtype,
                           gradient_checkpointing=args.gradient_checkpointing, weights=LossWeights(warm_steps=1))
    trainer = RemoeTrainer(adapter, cfg, batches(tokens, args.seq_len, args.batch), None, progress=False)
    for _ in range(args.warmup):
        trainer.train_step()
    synchronize(device)
    reset_peak_memory(device)
    t0 = time.perf_counter()
    records = [trainer.train_step() for _ in range(args.steps)]
    synchronize(device)
    seconds = time.perf_counter() - t0
    trainable = [p for p in model.parameters() if p.requires_grad]
    return {"family": args.family, "shape": "smoke" if args.smoke else "published", "device": str(device),
            "dtype": args.dtype, "gradient_checkpointing": args.gradient_checkpointing,
            "seq_len": args.seq_len, "batch": args.batch, "grad_accum": args.grad_accum, "steps": args.steps,
            "total_params": sum(p.numel() for p in model.parameters()),
            "trainable_params": sum(p.numel() for p in trainable),
            "optimizer_state_params": len(trainer.opt.state),
            "tokens_per_s": args.steps * args.grad_accum * args.batch * args.seq_len / seconds,
            "peak_memory_gib": round(peak_memory_bytes(device) / 2**30, 3),
            "ce_first": records[0]["ce"], "ce_last": records[-1]["ce"]}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", default="olmoe", choices=sorted(SHAPES))
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    p.add_argument("--smoke", action="store_true", help="tiny shape, seq 16, 1 step (seconds on a CPU)")
    args = p.parse_args(argv)
    if args.smoke:
        args.seq_len, args.steps, args.warmup = min(args.seq_len, 16), 1, 1
    return args


def main(argv: list[str] | None = None) -> dict:
    result = run(parse_args(argv))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    from mobilemoe.cli import run_reporting_errors

    sys.exit(run_reporting_errors("remoe_gpu", lambda: main() and 0))  # the report is printed; exit 0
