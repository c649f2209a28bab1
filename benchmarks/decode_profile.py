"""Where decode (or prefill) time goes: per-category wall time inside the native runtime's call.

    python benchmarks/decode_profile.py --model runs/bench-models/mobilemoe-s-int4
    python benchmarks/decode_profile.py --model runs/bench-models/mobilellm-pro-like-int4 --json
    python benchmarks/decode_profile.py --model runs/bench-models/mobilemoe-s-int4 --prefill --context 1024

Prefills ``--context`` tokens, then times ``--steps`` decode steps with ``NativeModel.set_profiling``
on (the categories are the native model's: moe_experts, lm_head, qkv_proj, attention, ...); with
``--prefill``, times one more prefill of the same ``--context`` tokens instead (after a warm-up one).
The INT4 checkpoints are the ones ``mobilemoe bench --cache-dir DIR`` writes. Prints a table, or JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from mobilemoe.runtime.native import NativeBackend


def profile_decode(model: str, context: int, steps: int) -> dict:
    backend = NativeBackend(model, context + steps + 1)
    vocab = backend.config.vocab_size
    backend.forward([(1000 + i) % vocab for i in range(context)], 0)
    backend.model.set_profiling(True)
    t0 = time.perf_counter()
    for i in range(steps):
        backend.forward([(7 + i) % vocab], context + i)
    wall = (time.perf_counter() - t0) / steps
    per_token_ms = {k: v / steps * 1e3 for k, v in sorted(backend.model.profile().items(), key=lambda kv: -kv[1])}
    return {"model": model, "context": context, "steps": steps, "threads": torch.get_num_threads(),
            "ms_per_token": per_token_ms, "sum_ms": sum(per_token_ms.values()), "wall_ms": wall * 1e3,
            "tok_s": 1.0 / wall}


def profile_prefill(model: str, context: int) -> dict:
    backend = NativeBackend(model, context + 1)
    vocab = backend.config.vocab_size
    ids = [(1000 + 7 * i) % vocab for i in range(context)]
    backend.forward(ids, 0)  # warm-up: first-touch of buffers, pool threads
    backend.model.set_profiling(True)
    t0 = time.perf_counter()
    backend.forward(ids, 0)
    wall = time.perf_counter() - t0
    ms = {k: v * 1e3 for k, v in sorted(backend.model.profile().items(), key=lambda kv: -kv[1])}
    return {"model": model, "context": context, "threads": torch.get_num_threads(), "ms_total": ms,
            "sum_ms": sum(ms.values()), "wall_ms": wall * 1e3, "tok_s": context / wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/bench-models/mobilemoe-s-int4", help="INT4 checkpoint directory")
    ap.add_argument("--context", type=int, default=256, help="tokens prefilled before the timed steps")
    ap.add_argument("--steps", type=int, default=48, help="decode steps timed")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill", action="store_true", help="profile a prefill of --context tokens instead")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    r = profile_prefill(args.model, args.context) if args.prefill else profile_decode(args.model, args.context, args.steps)
    if args.json:
        print(json.dumps(r, indent=2))
        return
    unit = f"ms for {args.context} tokens" if args.prefill else "ms / token"
    print(f"| category | {unit} |\n|---|---|")
    for k, v in r["ms_total" if args.prefill else "ms_per_token"].items():
        print(f"| {k} | {v:.3f} |")
    print(f"| total (wall {r['wall_ms']:.2f} ms = {r['tok_s']:.1f} tok/s) | {r['sum_ms']:.2f} |")


if __name__ == "__main__":
    main()
