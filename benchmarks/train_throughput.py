"""Training throughput of a MoE vs a dense baseline, and (optionally) the S recipe's first steps on real text.

Both models train through the real :class:`mobilemoe.train.Trainer` (forward + backward + AdamW step +
aux-free bias update) on synthetic tokens, in ONE process (CPU: alternating MoE / dense rounds so load
drift hits both alike; CUDA: one model after the other, each freed before the next). Reported per
model: tokens/s (per round and median), peak memory (CUDA: that model's peak allocated; CPU: peak RSS
of the whole process), and MFU = tokens/s x training FLOPs per token / peak FLOP/s,
with the FLOPs counted from ACTIVE parameters (``mobilemoe.accounting``: 3 x (2 x active matmul params
+ causal attention)). The peak is ``--peak-tflops`` (default: the bf16 dense spec of a known GPU;
unknown GPUs and CPUs report MFU null unless given).

Defaults follow the device: CUDA -> ``mobilemoe-s`` vs ``mobilellm-pro-like`` at seq 2048, bf16,
activation checkpointing off, compiled layers; CPU -> ``tiny-moe`` vs ``tiny-dense`` (same active
params) at seq 128, fp32 (the BENCHMARKS.md configuration). ``--device cuda`` without a GPU is refused.

``--real-steps N`` also runs the first N optimizer steps of ``recipes/mobilemoe-s.yaml``'s pretrain
stage (its optimizer, schedule, dtype, batch) on real text (``--real-data``, default
``../shared/data/wikitext-2/test.txt``) with a BPE tokenizer trained on it, and reports loss first/last, NaN
skips and the expert-load spread ((max - min) / mean count, 0 = balanced).

``--smoke``: tiny shapes and a few steps everywhere (seconds on a CPU; what the test runs).

Usage: python benchmarks/train_throughput.py [--device auto|cpu|cuda] [--rounds 5] [--steps 5] [--seq-len N]
       [--batch N] [--dtype float32|bfloat16] [--activation-checkpointing] [--compile auto|true|false]
       [--real-steps 200] [--real-data PATH] [--peak-tflops F] [--smoke] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from mobilemoe.accounting import account, attention_flops, matmul_params_per_token
from mobilemoe.config import preset
from mobilemoe.errors import MobileMoEError
from mobilemoe.train import TokenWindowSource, TrainConfig, Trainer
from mobilemoe.train.distributed import DistInfo
from mobilemoe.train.gpu import (build_on_meta, materialize, peak_memory_bytes, reset_peak_memory,
                                 resolve_device, synchronize)

ROOT = Path(__file__).resolve().parent.parent
# bf16 dense tensor-core peaks (vendor spec sheets, SXM parts); MFU is only as good as this number
PEAK_BF16_TFLOPS = {"H200": 989.5, "H100": 989.5, "A100": 312.0}
SMOKE_SHAPE = dict(vocab_size=320, hidden_size=64, head_dim=16, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=32, intermediate_size_mlp=64, num_hidden_layers=2, max_position_embeddings=128)


def train_flops_per_token(cfg, seq_len: int) -> float:
    """Forward + backward (3x forward) FLOPs per token from active parameters, causal attention."""
    return 3.0 * (2.0 * matmul_params_per_token(cfg) + attention_flops(cfg, (seq_len + 1) / 2))


def peak_flops(device: torch.device, tflops: float | None) -> float | None:
    if tflops is not None:
        return tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_BF16_TFLOPS.items():
            if key in name:
                return value * 1e12
    return None


def model_config(name: str, smoke: bool):
    if not smoke:
        return preset(name)
    experts = 0 if preset(name).num_local_experts == 0 else 8
    return preset(name, **SMOKE_SHAPE, num_local_experts=experts, num_experts_per_tok=2 if experts else 0)


def make_trainer(name: str, args, device: torch.device) -> tuple[Trainer, dict]:
    cfg = model_config(name, args.smoke)
    model = materialize(build_on_meta(cfg), device, seed=0)  # allocated on the device, never on the host first
    tokens = torch.randint(0, cfg.vocab_size, (max(200_000, 4 * args.seq_len * args.batch),),
                           generator=torch.Generator().manual_seed(0))
    src = TokenWindowSource(tokens, args.seq_len, args.batch, seed=0)
    tcfg = TrainConfig(max_steps=10**9, lr=1e-4, warmup_steps=0, schedule="constant", dtype=args.dtype,
                       progress=False, tensorboard=False, activation_checkpointing=args.activation_checkpointing,
                       compile=args.compile)
    trainer = Trainer(model, tcfg, src, dist_info=DistInfo(device=device))
    acc = account(cfg)
    return trainer, {"preset": name, "total_params": acc.total_params, "active_params": acc.active_params,
                     "experts": cfg.num_local_experts, "top_k": cfg.num_experts_per_tok,
                     "train_flops_per_token": train_flops_per_token(cfg, args.seq_len)}


def timed_round(trainer: Trainer, steps: int, device: torch.device) -> tuple[float, list[dict]]:
    synchronize(device)
    t0 = time.perf_counter()
    records = [trainer.train_step() for _ in range(steps)]
    synchronize(device)
    return sum(r["tokens"] for r in records) / (time.perf_counter() - t0), records


def synthetic(args, device: torch.device) -> dict:
    """CPU: both models built up front, then alternating timed rounds (load drift hits both alike).
    CUDA: one model at a time, freed before the next, so each one's peak memory is its own."""
    roles = (("moe", args.moe), ("dense", args.dense))
    rates: dict[str, list[float]] = {role: [] for role, _ in roles}
    bad = {role: 0 for role, _ in roles}
    infos, peaks, live, bases = {}, {}, {}, {}

    def build(role: str, name: str) -> None:
        reset_peak_memory(device)
        bases[role] = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        trainer, infos[role] = make_trainer(name, args, device)
        for _ in range(args.warmup):
            trainer.train_step()
        synchronize(device)
        peaks[role] = peak_memory_bytes(device) - bases[role]
        live[role] = trainer

    def time_round(role: str) -> None:
        rate, records = timed_round(live[role], args.steps, device)
        rates[role].append(rate)
        bad[role] += sum(bool(rec.get("skipped")) for rec in records)

    if device.type == "cuda":
        for role, name in roles:
            build(role, name)
            for _ in range(args.rounds):
                time_round(role)
            peaks[role] = peak_memory_bytes(device) - bases[role]  # warm-up and timed rounds
            del live[role]
            torch.cuda.empty_cache()
    else:
        for role, name in roles:
            build(role, name)
        for r in range(args.rounds):
            for role in (["moe", "dense"] if r % 2 == 0 else ["dense", "moe"]):
                time_round(role)
    peak = peak_flops(device, args.peak_tflops)
    out = {}
    for role, _ in roles:
        info, med = infos[role], statistics.median(rates[role])
        out[role] = {**info, "tokens_per_s_rounds": [round(x, 1) for x in rates[role]],
                     "tokens_per_s_median": round(med, 1), "nan_skips": bad[role],
                     "peak_memory_gib": round(peaks[role] / 2**30, 3),
                     "mfu": round(med * info["train_flops_per_token"] / peak, 4) if peak else None}
    return {"models": out, "moe_over_dense": round(out["moe"]["tokens_per_s_median"]
                                                   / out["dense"]["tokens_per_s_median"], 3)}


def real_text(args, device: torch.device) -> dict:
    """The first ``--real-steps`` steps of mobilemoe-s's pretrain stage on real text."""
    import tempfile

    from mobilemoe.train.recipe import DataSpec, load_recipe
    from mobilemoe.train.run import build_model, build_sources, prepare_tokenizer

    data = Path(args.real_data)
    if not data.exists():
        raise MobileMoEError(f"--real-data {data}: no such file or directory")
    recipe = load_recipe(ROOT / "recipes" / "mobilemoe-s.yaml")
    stage = recipe.stage("pretrain")
    recipe.data = DataSpec(source=str(data), tokenizer="train", vocab_size=args.real_vocab, val_fraction=0.0)
    if args.smoke:
        recipe.model.overrides = {**SMOKE_SHAPE, "num_local_experts": 8, "num_experts_per_tok": 2}
        stage.seq_len, stage.micro_batch_size, stage.grad_accum = 32, 2, 1
    if args.real_batch is not None:
        stage.micro_batch_size = args.real_batch
    if args.real_grad_accum is not None:
        stage.grad_accum = args.real_grad_accum
    with tempfile.TemporaryDirectory(prefix="mobilemoe-bench-") as tmp:
        info = DistInfo(device=device)
        tok = prepare_tokenizer(recipe, Path(tmp), args.real_vocab)
        train_src, _ = build_sources(recipe, stage, tok, Path(tmp), info, recipe.seed)
        model = build_model(recipe, tok.vocab_size)
        cfg = stage.train_config(stage.max_steps)  # the recipe's schedule: these are its first steps
        cfg.progress, cfg.tensorboard = False, False
        trainer = Trainer(model, cfg, train_src, dist_info=info)
        reset_peak_memory(device)
        t0 = time.perf_counter()
        records = [trainer.train_step() for _ in range(args.real_steps)]
        synchronize(device)
        seconds = time.perf_counter() - t0
    done = [r for r in records if not r.get("skipped")]
    spread = [r["expert_count_spread"] for r in done if "expert_count_spread" in r]
    k = max(1, len(done) // 10)
    return {"recipe": "mobilemoe-s", "stage": "pretrain", "data": str(data), "steps": len(records),
            "tokens_per_step": stage.tokens_per_step(), "nan_skips": len(records) - len(done),
            "loss_first": done[0]["loss"] if done else None, "loss_last": done[-1]["loss"] if done else None,
            "loss_first_10pct_mean": statistics.mean(r["loss"] for r in done[:k]) if done else None,
            "loss_last_10pct_mean": statistics.mean(r["loss"] for r in done[-k:]) if done else None,
            "expert_count_spread_first": spread[0] if spread else None,
            "expert_count_spread_last": spread[-1] if spread else None,
            "lr_last": records[-1]["lr"] if records else None,
            "tokens_per_s": sum(r["tokens"] for r in records) / seconds,
            "peak_memory_gib": round(peak_memory_bytes(device) / 2**30, 3)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--moe", default=None, help="MoE preset (CUDA: mobilemoe-s, CPU: tiny-moe)")
    p.add_argument("--dense", default=None, help="dense baseline preset (CUDA: mobilellm-pro-like, CPU: tiny-dense)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=5, help="optimizer steps per timed round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model first (compilation happens here)")
    p.add_argument("--seq-len", type=int, default=None, help="CUDA: 2048, CPU: 128")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (CUDA: 4, CPU: 8)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="CUDA: bfloat16, CPU: float32")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--compile", default="auto", choices=["auto", "true", "false"])
    p.add_argument("--peak-tflops", type=float, default=None, help="peak FLOP/s for MFU (default: known GPUs)")
    p.add_argument("--real-steps", type=int, default=0, help="also run the S recipe's first N steps on real text")
    p.add_argument("--real-data", default=str(ROOT.parent / "shared" / "data" / "wikitext-2" / "test.txt"),
                   help="a text file (default ../shared/data/wikitext-2/test.txt, ~1.3 MB: at the recipe's batch "
                        "the steps cycle through it many times)")
    p.add_argument("--real-vocab", type=int, default=32000, help="BPE vocabulary trained on --real-data")
    p.add_argument("--real-batch", type=int, default=None, help="override the recipe's micro_batch_size")
    p.add_argument("--real-grad-accum", type=int, default=None, help="override the recipe's grad_accum")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--smoke", action="store_true", help="tiny shapes, 1 round of 1 step (seconds on a CPU)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    args.compile = {"auto": "auto", "true": True, "false": False}[args.compile]
    return args


def apply_defaults(args, device: torch.device) -> None:
    cuda = device.type == "cuda"
    args.moe = args.moe or ("mobilemoe-s" if cuda else "tiny-moe")
    args.dense = args.dense or ("mobilellm-pro-like" if cuda else "tiny-dense")
    args.seq_len = args.seq_len or (32 if args.smoke else 2048 if cuda else 128)
    args.batch = args.batch or (2 if args.smoke else 4 if cuda else 8)
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    if args.smoke:
        args.rounds, args.steps, args.warmup = 1, 1, 1
        args.real_vocab = min(args.real_vocab, 300)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    apply_defaults(args, device)
    result = {"device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "dtype": args.dtype,
              "seq_len": args.seq_len, "batch": args.batch, "steps_per_round": args.steps, "rounds": args.rounds,
              "activation_checkpointing": args.activation_checkpointing, "compile": args.compile,
              "smoke": args.smoke, **synthetic(args, device)}
    if args.real_steps:
        result["real_text"] = real_text(args, device)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    from mobilemoe.cli import run_reporting_errors

    sys.exit(run_reporting_errors("train_throughput", lambda: main() and 0))  # the report is printed; exit 0
