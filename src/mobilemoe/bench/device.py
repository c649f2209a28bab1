"""On-device benchmark: ``python -m mobilemoe.bench.device`` on a phone (Termux), an ARM board or a Mac.

Runs the same sweep as ``mobilemoe bench`` (:func:`mobilemoe.bench.moe_vs_dense.run`: random INT4
models of real presets, or ``--model CKPT``, each in its own worker process) and writes the same JSON
plus a ``device`` block: OS / Termux, CPU model and SIMD features, the kernel ISA the workers ran
and every ISA this CPU can run, threads and RAM. Nothing is fetched from the internet.

    python -m mobilemoe.bench.device                      # mobilemoe-s vs dense at 256/1K/2K
    python -m mobilemoe.bench.device --quick --preset tiny-moe --dense tiny-dense
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from typing import Any

from mobilemoe.errors import MobileMoEError

PROG = "python -m mobilemoe.bench.device"
DEFAULT_CONTEXTS = [256, 1024, 2048]
# --quick: one repeat of a few decode steps at one short context, and a small DRAM probe, so a tiny
# preset finishes in seconds (a smoke test of the install; not numbers to publish).
QUICK = {"contexts": [256], "decode_tokens": 8, "repeats": 1, "bandwidth_bytes": 64 << 20}


def build_parser() -> argparse.ArgumentParser:
    from mobilemoe.bench.moe_vs_dense import BenchConfig

    d = BenchConfig()
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0] + " Writes mobilemoe bench's "
                                "JSON plus a 'device' block; needs no network.")
    p.add_argument("--preset", default=d.moe, help=f"MoE preset to time with random INT4 weights (default {d.moe})")
    p.add_argument("--model", default=None, help="time this INT4 checkpoint directory instead of --preset")
    p.add_argument("--dense", default=d.dense, help=f"dense preset it is compared with (default {d.dense})")
    p.add_argument("--contexts", default=None,
                   help="comma-separated context lengths (default 256,1024,2048; --quick: 256)")
    p.add_argument("--decode-tokens", type=int, default=None,
                   help=f"decode steps per context (default {d.decode_tokens})")
    p.add_argument("--repeats", type=int, default=None, help=f"repeats, medians reported (default {d.repeats})")
    p.add_argument("--threads", type=int, default=default_threads(),
                   help="threads (default: logical CPUs, at most 4 -- big cores on most phones)")
    p.add_argument("--backend", default=d.backend, choices=["auto", "native", "reference"])
    p.add_argument("--cache-dir", default=d.cache_dir, help="where random models are written once")
    p.add_argument("--quick", action="store_true", help="seconds-long smoke run: 1 repeat, 8 decode steps, ctx 256")
    p.add_argument("--out", default="mobilemoe-device-bench.json", help="JSON report path")
    p.add_argument("--json", action="store_true", help="also print the JSON report to stdout")
    return p


def default_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def parse_contexts(text: str | None, quick: bool) -> list[int]:
    if text is None:
        return list(QUICK["contexts"] if quick else DEFAULT_CONTEXTS)
    try:
        contexts = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise MobileMoEError(f"--contexts: expected comma-separated integers, got {text!r}") from None
    if not contexts or min(contexts) < 1:
        raise MobileMoEError(f"--contexts: expected positive context lengths, got {text!r}")
    return contexts


def require_native_kernels(backend: str) -> None:
    """Refuse (one line) where mobilemoe._C is not built: the numbers would be the slow reference path."""
    from mobilemoe import kernels

    if backend != "reference" and not kernels.is_available():
        raise MobileMoEError(
            "the native INT4 kernels (mobilemoe._C) are not built, so there is nothing to benchmark; install "
            "from a clone with a C++17 compiler: `pip install --no-build-isolation -e .` (or pass "
            f"--backend reference to time the pure-PyTorch path). Import error: {kernels._IMPORT_ERROR}")


def device_info(threads: int, quick: bool) -> dict[str, Any]:
    """Everything about this machine a result needs to be read against (the ``device`` block)."""
    from mobilemoe import kernels
    from mobilemoe.bench.system import cpu_features, cpu_model, memory_bytes, os_info

    mem = memory_bytes()
    return {
        "os": os_info(),
        "cpu": cpu_model(),
        "cpu_features": cpu_features(),
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "memory_total_bytes": mem["total"],
        "memory_available_bytes": mem["available"],
        "kernel_isas_available": kernels.available_isas() if kernels.is_available() else [],
        "kernel_isa_env": os.environ.get("MOBILEMOE_KERNEL_ISA"),
        "python": platform.python_version(),
        "quick": quick,
    }


def config_from_args(args: argparse.Namespace):
    from mobilemoe.bench.moe_vs_dense import BenchConfig

    d = BenchConfig()
    if args.threads < 1:
        raise MobileMoEError(f"--threads: expected a positive number, got {args.threads}")
    for flag, value in (("--decode-tokens", args.decode_tokens), ("--repeats", args.repeats)):
        if value is not None and value < 1:
            raise MobileMoEError(f"{flag}: expected a positive number, got {value}")
    if args.model is not None and not os.path.isfile(os.path.join(args.model, "config.json")):
        raise MobileMoEError(f"--model {args.model}: not a checkpoint directory (no config.json)")
    pick = (lambda given, full, quick: given if given is not None else (quick if args.quick else full))
    return BenchConfig(moe=args.model or args.preset, dense=args.dense,
                       contexts=parse_contexts(args.contexts, args.quick),
                       decode_tokens=pick(args.decode_tokens, d.decode_tokens, QUICK["decode_tokens"]),
                       repeats=pick(args.repeats, d.repeats, QUICK["repeats"]),
                       threads=args.threads, backend=args.backend, cache_dir=args.cache_dir)


def run_device(args: argparse.Namespace) -> dict[str, Any]:
    """The ``mobilemoe bench`` report of this sweep, plus ``device`` (with the kernel ISA that ran)."""
    from mobilemoe.bench.moe_vs_dense import run

    require_native_kernels(args.backend)
    cfg = config_from_args(args)
    result = run(cfg, progress=sys.stderr.isatty(),
                 bandwidth_bytes=QUICK["bandwidth_bytes"] if args.quick else None)
    device = device_info(cfg.threads, args.quick)
    isas = {k["kernel_isa"] for k in result["kernels"].values() if k["kernel_isa"]}
    device["kernel_isa"] = sorted(isas)[0] if len(isas) == 1 else (sorted(isas) or None)
    return {**result, "device": device}


def summary(result: dict[str, Any]) -> list[str]:
    cfg, dev = result["bench_config"], result["device"]
    available = ", ".join(dev["kernel_isas_available"])
    lines = [f"{dev['os']['name'] or dev['os']['system']} {dev['os']['machine']}, {dev['cpu']}, "
             f"{cfg['threads']} threads, kernels {dev['kernel_isa']} (available: {available})"]
    for c in cfg["contexts"]:
        lines.append(f"  ctx {c:>5}: {cfg['moe']} decode {result[f'moe_decode_tok_s_{c}']:.1f} tok/s, prefill "
                     f"{result[f'moe_prefill_tok_s_{c}']:.1f} tok/s, TTFT {result[f'moe_ttft_s_{c}']:.3f} s | "
                     f"{cfg['dense']} decode {result[f'dense_decode_tok_s_{c}']:.1f} tok/s")
    lines.append(f"  peak RSS: {result['moe_peak_rss_bytes'] / 2**20:.0f} MiB (MoE), "
                 f"{result['dense_peak_rss_bytes'] / 2**20:.0f} MiB (dense)")
    return lines


def main(argv: list[str] | None = None) -> int:
    from mobilemoe.cli import run_reporting_errors

    args = build_parser().parse_args(argv)
    return run_reporting_errors(PROG, lambda: _run_and_write(args))


def _run_and_write(args: argparse.Namespace) -> int:
    from mobilemoe.utils import atomic_write_text

    result = run_device(args)
    text = json.dumps(result, indent=2) + "\n"
    atomic_write_text(args.out, text)
    if args.json:
        sys.stdout.write(text)
    else:
        print("\n".join(summary(result)))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
