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


def build_parser() -> argparse.ArgumentParser:
    """The script's flags; every default comes from BenchConfig (shared with ``mobilemoe bench``)."""
    d = BenchConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--moe", default=d.moe)
    p.add_argument("--dense", default=d.dense)
    p.add_argument("--contexts", default=",".join(map(str, d.contexts)))
    p.add_argument("--decode-tokens", type=int, default=d.decode_tokens)
    p.add_argument("--repeats", type=int, default=d.repeats)
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--with-llama-cpp", action="store_true")
    p.add_argument("--cache-dir", default=d.cache_dir)
    p.add_argument("--out", default="runs/bench/moe_vs_dense.json")
    return p


def main() -> None:
    p = build_parser()
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
