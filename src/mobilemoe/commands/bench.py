"""``mobilemoe bench``: MoE vs dense INT4 speed at comparable memory, optionally beside llama.cpp."""

from __future__ import annotations

import argparse

from mobilemoe.commands.common import print_json


def register(sub: argparse._SubParsersAction) -> None:
    from mobilemoe.bench.moe_vs_dense import BenchConfig

    p = sub.add_parser("bench", help="MoE vs dense INT4 runtime benchmark (TTFT, prefill, decode, RSS)",
                       description="Random-initialised INT4 models of real presets, batch 1: TTFT, prefill and "
                                   "decode tok/s at each context, peak RSS, the accounting ceilings of each ratio "
                                   "and the DRAM roofline. Models alternate within one run; medians of repeats.")
    d = BenchConfig()  # the one set of defaults, shared with benchmarks/moe_vs_dense.py
    p.add_argument("--moe", default=d.moe, help=f"MoE preset (default {d.moe})")
    p.add_argument("--dense", default=d.dense, help=f"dense preset (default {d.dense})")
    p.add_argument("--contexts", default=",".join(map(str, d.contexts)), help="comma-separated context lengths")
    p.add_argument("--decode-tokens", type=int, default=d.decode_tokens,
                   help=f"decode steps timed per context (default {d.decode_tokens})")
    p.add_argument("--repeats", type=int, default=d.repeats,
                   help=f"repeats; medians are reported (default {d.repeats})")
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--backend", default=d.backend, choices=["auto", "native", "reference"])
    p.add_argument("--with-llama-cpp", action="store_true",
                   help="also time llama.cpp on Q4_0 GGUFs of the same shapes (installed by make setup), in its own "
                        "processes: a llama.cpp crash is reported as one line and the mobilemoe numbers still are")
    p.add_argument("--cache-dir", default=d.cache_dir, help="where random models are written once")
    p.add_argument("--plot", default=None, help="write the figure to this PNG")
    p.add_argument("--json", action="store_true", help="print the full JSON report")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mobilemoe.bench.moe_vs_dense import BenchConfig, plot
    from mobilemoe.bench.moe_vs_dense import run as run_bench
    from mobilemoe.errors import MobileMoEError

    try:
        contexts = [int(c) for c in args.contexts.split(",") if c.strip()]
    except ValueError:
        raise MobileMoEError(f"--contexts: expected comma-separated integers, got {args.contexts!r}") from None
    cfg = BenchConfig(moe=args.moe, dense=args.dense, contexts=contexts, decode_tokens=args.decode_tokens,
                      repeats=args.repeats, threads=args.threads, with_llama_cpp=args.with_llama_cpp,
                      backend=args.backend, cache_dir=args.cache_dir)
    result = run_bench(cfg)
    if args.plot:
        plot(result, args.plot)
    if args.json:
        print_json(result)
        return 0
    for runtime, data in result["by_runtime"].items():
        if runtime == "ceilings":
            continue
        print(f"{runtime}:")
        for c in contexts:
            print(f"  ctx {c:>5}: decode {data[f'moe_decode_tok_s_{c}']:7.1f} vs {data[f'dense_decode_tok_s_{c}']:6.1f} "
                  f"tok/s (x{data[f'decode_speedup_{c}']:.2f}, ceiling x{result['by_runtime']['ceilings'][str(c)]['decode_ceiling']:.2f}); "
                  f"prefill {data[f'moe_prefill_tok_s_{c}']:7.1f} vs {data[f'dense_prefill_tok_s_{c}']:6.1f} tok/s "
                  f"(x{data[f'prefill_speedup_{c}']:.2f}, ceiling x{result['by_runtime']['ceilings'][str(c)]['prefill_ceiling']:.2f})")
        print(f"  peak RSS: MoE {data['moe_peak_rss_bytes'] / 2**20:.0f} MiB, dense {data['dense_peak_rss_bytes'] / 2**20:.0f} MiB")
    llama = result.get("llama_cpp")
    if isinstance(llama, dict) and "error" in llama:  # the mobilemoe numbers above still stand
        print(f"llama_cpp: error: {llama['error']}")
    print(f"DRAM read bandwidth: {result['dram_read_gbs']:.1f} GB/s")
    return 0
