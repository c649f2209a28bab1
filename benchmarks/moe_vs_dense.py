"""MoE vs dense INT4 runtime sweep (the runtime issue's benchmark), optionally beside llama.cpp.

Random-initialised INT4 models of the real presets; batch 1; TTFT, prefill and decode tok/s at each
context; peak RSS; the accounting ceiling of each ratio; measured DRAM bandwidth and rooflines.
Both models (and llama.cpp, with --with-llama-cpp) alternate within one run; medians of repeats.

    python benchmarks/moe_vs_dense.py --with-llama-cpp --out runs/bench/moe_vs_dense.json
    python benchmarks/moe_vs_dense.py --moe mobilemoe-l --contexts 256,1024   # other tiers
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mobilemoe.bench.moe_vs_dense import BenchConfig, plot, run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--moe", default="mobilemoe-s")
    p.add_argument("--dense", default="mobilellm-pro-like")
    p.add_argument("--contexts", default="256,1024,2048,4096")
    # 5 x 64 tokens: 3 x 32 (~0.1 s of MoE-S decode each) left the medians at the mercy of this shared
    # machine's bandwidth bursts (one sweep's three MoE-S samples at 256: 231 / 249 / 297 tok/s).
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--with-llama-cpp", action="store_true")
    p.add_argument("--cache-dir", default="runs/bench-models")
    p.add_argument("--out", default="runs/bench/moe_vs_dense.json")
    args = p.parse_args()
    cfg = BenchConfig(moe=args.moe, dense=args.dense, contexts=[int(c) for c in args.contexts.split(",")],
                      decode_tokens=args.decode_tokens, repeats=args.repeats, threads=args.threads,
                      with_llama_cpp=args.with_llama_cpp, cache_dir=args.cache_dir)
    result = run(cfg)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    print(json.dumps({k: v for k, v in result.items() if k not in ("samples", "by_runtime")}, indent=2))


if __name__ == "__main__":
    main()
