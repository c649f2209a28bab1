"""Training throughput of a tiny MoE vs a dense model with the same active parameter count.

Both models train (forward + backward + AdamW step + aux-free bias update, through the real
:class:`mobilemoe.train.Trainer`) on random tokens, in ONE process, alternating MoE / dense rounds
so machine-load drift hits both alike. Prints one JSON object: tokens/s per round and the median,
plus total/active parameter counts (the dense model matches the MoE's active parameters).

Usage: python benchmarks/train_throughput.py [--rounds 5] [--steps 5] [--seq-len 128] [--batch 8]
                                             [--dtype float32|bfloat16] [--threads N] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from mobilemoe.accounting import account
from mobilemoe.config import preset
from mobilemoe.model import MobileMoEForCausalLM
from mobilemoe.train import TokenWindowSource, TrainConfig, Trainer
from mobilemoe.train.distributed import DistInfo


def make_trainer(preset_name: str, args, device: torch.device) -> tuple[Trainer, dict]:
    cfg = preset(preset_name)
    torch.manual_seed(0)
    model = MobileMoEForCausalLM(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (200_000,), generator=torch.Generator().manual_seed(0))
    src = TokenWindowSource(tokens, args.seq_len, args.batch, seed=0)
    tcfg = TrainConfig(max_steps=10**9, lr=1e-4, warmup_steps=0, schedule="constant", dtype=args.dtype,
                       progress=False, tensorboard=False)
    trainer = Trainer(model, tcfg, src, dist_info=DistInfo(device=device))
    acc = account(cfg)
    return trainer, {"preset": preset_name, "total_params": acc.total_params, "active_params": acc.active_params,
                     "experts": cfg.num_local_experts, "top_k": cfg.num_experts_per_tok}


def timed_round(trainer: Trainer, steps: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    tokens = sum(trainer.train_step()["tokens"] for _ in range(steps))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return tokens / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--moe", default="tiny-moe", help="MoE preset (default tiny-moe)")
    p.add_argument("--dense", default="tiny-dense", help="dense preset with the same active params (tiny-dense)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=5, help="optimizer steps per timed round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    models = {"moe": make_trainer(args.moe, args, device), "dense": make_trainer(args.dense, args, device)}
    for trainer, _ in models.values():
        for _ in range(args.warmup):
            trainer.train_step()
    rates: dict[str, list[float]] = {name: [] for name in models}
    for r in range(args.rounds):
        order = ["moe", "dense"] if r % 2 == 0 else ["dense", "moe"]  # alternate who goes first
        for name in order:
            rates[name].append(timed_round(models[name][0], args.steps, device))
    med = {name: statistics.median(v) for name, v in rates.items()}
    print(json.dumps({
        "device": str(device), "threads": torch.get_num_threads(), "dtype": args.dtype,
        "seq_len": args.seq_len, "batch": args.batch, "steps_per_round": args.steps, "rounds": args.rounds,
        "models": {name: {**info, "tokens_per_s_rounds": [round(x, 1) for x in rates[name]],
                          "tokens_per_s_median": round(med[name], 1)} for name, (_, info) in models.items()},
        "moe_over_dense": round(med["moe"] / med["dense"], 3),
    }, indent=2))


if __name__ == "__main__":
    main()
