"""Benchmark of the native INT4 kernels (mobilemoe._C) vs torch's CPU int4 and bf16 matmuls.

Prints one JSON object. Numbers on a shared machine are noisy: each figure is the median of
several timed runs after warm-up.

* gemv: y = x @ W.T with M=1 over a rotation of weights whose packed bytes total > 200 MB (far
  larger than L3), so every call streams its weight from DRAM; reported as GB/s of packed weight
  bytes (codes + scales) and compared with torch._weight_int4pack_mm_for_cpu (bf16 activations,
  same int4 bits, 16 B/row-group overhead differs) and bf16 dense F.linear.
* gemm: M=256 (and optionally more) tokens through a [N, K] weight: GFLOP/s = 2*M*N*K / t.
* moe: one fused MoE layer (default MobileMoE config dims) at decode and at prefill.

Usage: python benchmarks/kernels_bench.py [--quick] [--threads N] [--isa avx512|avx2|portable]
                                         [--only gemv|gemm|moe] [--clock wall|cpu]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from mobilemoe import kernels as K
from mobilemoe.quant import quantize


CLOCK = {"fn": time.perf_counter}


def timeit_many(fns: dict, reps: int, warmup: int = 2) -> dict:
    """Time several callables in interleaved rounds (so load from other processes hits all alike);
    returns {name: (min, median)} in seconds."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    clock = CLOCK["fn"]
    ts = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = clock()
            fn()
            ts[name].append(clock() - t0)
    return {name: (min(v), statistics.median(v)) for name, v in ts.items()}


def random_q4(n: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random packed codes and scales directly (quantizing 8192x8192 floats would be slow)."""
    qweight = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen)
    scale = (torch.rand(n, k // 32, generator=gen) * 0.02 + 0.001).to(torch.float16)
    return qweight, scale


def torch_int4(qweight: torch.Tensor, scale: torch.Tensor):
    """The same int4 weight in torch's CPU int4pack format (asymmetric form with zero = 0)."""
    from mobilemoe.quant import unpack_int4
    codes = unpack_int4(qweight).to(torch.int32) + 8  # 0..15, value = (q - 8) * scale
    packed = torch._convert_weight_to_int4pack_for_cpu(codes, 2)
    n, k = codes.shape
    sz = torch.zeros(k // 32, n, 2, dtype=torch.bfloat16)
    sz[..., 0] = scale.T.to(torch.bfloat16)
    return packed, sz


def bench_gemv(n: int, k: int, count: int, reps: int, gen) -> dict:
    """M=1 over `count` rotated weights (each call reads a weight not in cache). All three
    variants are timed in interleaved rounds; GB/s counts each variant's own weight bytes."""
    weights = [random_q4(n, k, gen) for _ in range(count)]
    packed = [K.PackedLinear.from_quantized(q, s) for q, s in weights]
    tw = [torch_int4(q, s) for q, s in weights]
    nb = max(2, count // 2)  # bf16 weights are 3.6x larger: fewer copies already exceed L3 many times
    dense = [torch.randn(n, k, generator=gen).to(torch.bfloat16) for _ in range(nb)]
    del weights
    x = torch.randn(1, k, generator=gen)
    xb = x.to(torch.bfloat16)
    it = {"ours": 0, "tint4": 0, "bf16": 0}

    def ours():
        it["ours"] += 1
        packed[it["ours"] % count](x)

    def tint4():
        it["tint4"] += 1
        p, sz = tw[it["tint4"] % count]
        torch._weight_int4pack_mm_for_cpu(xb, p, 32, sz)

    def bf16():
        it["bf16"] += 1
        F.linear(xb, dense[it["bf16"] % nb])

    r = timeit_many({"mobilemoe": ours, "torch_int4": tint4, "bf16": bf16}, reps * count, warmup=count)
    nbytes = {"mobilemoe": packed[0].nbytes, "torch_int4": tw[0][0].numel() + tw[0][1].numel() * 2,
              "bf16": n * k * 2}
    res = {"shape": [n, k], "weights_rotated": count, "total_packed_MB": round(nbytes["mobilemoe"] * count / 2**20, 1)}
    for name, (tmin, tmed) in r.items():
        res[name] = {"bytes_MB": round(nbytes[name] / 2**20, 1), "ms_min": round(tmin * 1e3, 3),
                     "ms_median": round(tmed * 1e3, 3), "GBps_best": round(nbytes[name] / tmin / 1e9, 2),
                     "GBps_median": round(nbytes[name] / tmed / 1e9, 2)}
    return res


def bench_gemm(n: int, k: int, m: int, reps: int, gen) -> dict:
    q, s = random_q4(n, k, gen)
    p = K.PackedLinear.from_quantized(q, s)
    x = torch.randn(m, k, generator=gen)
    tp, sz = torch_int4(q, s)
    xb = x.to(torch.bfloat16)
    wb = torch.randn(n, k, generator=gen).to(torch.bfloat16)
    flops = 2 * m * n * k
    r = timeit_many({"mobilemoe": lambda: p(x),
                     "torch_int4": lambda: torch._weight_int4pack_mm_for_cpu(xb, tp, 32, sz),
                     "bf16": lambda: F.linear(xb, wb)}, reps)
    res = {"M": m, "shape": [n, k]}
    for name, (tmin, tmed) in r.items():
        res[name] = {"ms_min": round(tmin * 1e3, 3), "ms_median": round(tmed * 1e3, 3),
                     "GFLOPs_best": round(flops / tmin / 1e9, 1), "GFLOPs_median": round(flops / tmed / 1e9, 1)}
    return res


def bench_moe(H: int, I: int, E: int, k: int, S: int, T: int, reps: int, gen, layers: int = 1) -> dict:
    """One fused MoE layer; with layers > 1, calls rotate over that many copies (distinct memory) and
    decode draws fresh expert ids per call, so weights come from DRAM as in a real model."""
    gu = quantize(torch.randn(E, H, 2 * I, generator=gen) * 0.02)
    dn = quantize(torch.randn(E, I, H, generator=gen) * 0.02)
    sh = tuple(quantize(torch.randn(*shape, generator=gen) * 0.02) for shape in [(S, H), (S, H), (H, S)])
    base = K.PackedMoE.from_quantized(gu, dn, sh)
    mods = [base] + [K.PackedMoE(K.PackedExperts(base.gate_up.codes.clone(), base.gate_up.scales.clone(), H, 2 * I),
                                 K.PackedExperts(base.down.codes.clone(), base.down.scales.clone(), I, H),
                                 K.PackedSwiGLU(K.PackedLinear(base.shared.gate_up.data.clone(), 2 * S, H),
                                                K.PackedLinear(base.shared.down.data.clone(), H, S)))
                     for _ in range(layers - 1)]
    x = torch.randn(T, H, generator=gen)
    n_id = 64
    id_sets = [torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)]) for _ in range(n_id)]
    w = torch.rand(T, k, generator=gen)
    state = {"i": 0}

    def call():
        i = state["i"]
        state["i"] += 1
        mods[i % layers](x, id_sets[i % n_id], w)

    ts = []
    call()
    clock = CLOCK["fn"]
    for _ in range(reps):
        t0 = clock()
        call()
        ts.append(clock() - t0)
    tmin, tmed = min(ts), statistics.median(ts)
    used = statistics.mean(ids.unique().numel() for ids in id_sets)
    per_expert = (base.gate_up.nbytes + base.down.nbytes) / E
    read = used * per_expert + base.shared.gate_up.nbytes + base.shared.down.nbytes
    flops = 2 * T * (k * 3 * H * I + 3 * H * S)
    return {"T": T, "H": H, "I": I, "E": E, "k": k, "S": S, "layers_rotated": layers,
            "total_MB": round(layers * (E * per_expert + base.shared.gate_up.nbytes + base.shared.down.nbytes) / 2**20, 1),
            "weight_MB_read_per_call": round(read / 2**20, 2),
            "ms_min": round(tmin * 1e3, 3), "ms_median": round(tmed * 1e3, 3),
            "tok_per_s_best": round(T / tmin, 1), "tok_per_s_median": round(T / tmed, 1),
            "GBps_best": round(read / tmin / 1e9, 2), "GFLOPs_best": round(flops / tmin / 1e9, 1),
            "GFLOPs_median": round(flops / tmed / 1e9, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller sizes (smoke test)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--isa", default=None)
    ap.add_argument("--only", choices=["gemv", "gemm", "moe"], default=None)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: process CPU time (with --threads 1 only): ignores time the process spends "
                         "descheduled on a shared machine")
    args = ap.parse_args()
    if args.clock == "cpu":
        if args.threads != 1:
            ap.error("--clock cpu needs --threads 1 (CPU time of several threads adds up)")
        CLOCK["fn"] = time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.isa:
        K.set_isa(args.isa)
    gen = torch.Generator().manual_seed(0)
    out = {"isa": K.active_isa(), "available_isas": K.available_isas(), "threads": torch.get_num_threads(),
           "timing": f"{args.clock} clock; min (best) and median of repeated runs after warm-up; variants interleaved",
           "note": "shared, noisy 2-core machine: treat as indicative"}
    if args.quick:
        out["gemv"] = bench_gemv(2048, 2048, 2, 3, gen)
        out["gemm"] = [bench_gemm(1024, 1024, 64, 3, gen)]
        out["moe"] = [bench_moe(256, 128, 8, 2, 256, 1, 6, gen, layers=2), bench_moe(256, 128, 8, 2, 256, 32, 3, gen)]
    else:
        if args.only in (None, "gemv"):
            out["gemv"] = bench_gemv(8192, 8192, 6, 5, gen)  # 6 x 37.7 MB packed = 226 MB rotated
        if args.only in (None, "gemm"):
            out["gemm"] = [bench_gemm(2048, 2048, 256, 5, gen), bench_gemm(8192, 2048, 1024, 3, gen)]
        if args.only in (None, "moe"):
            # default MobileMoE dims; 6 rotated layers = ~190 MB, far larger than L3
            out["moe"] = [bench_moe(768, 384, 60, 4, 1536, 1, 60, gen, layers=6),
                          bench_moe(768, 384, 60, 4, 1536, 256, 6, gen, layers=1)]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
