"""Every GGUF type of one INT4 checkpoint against the exact INT4 float forward, beside the native runtime.

Builds a random-weight INT4 checkpoint of a preset in the released layout (or takes ``--ckpt``),
exports it with ``mobilemoe export gguf`` for each ``--types`` entry, and reports per type:

* size: GGUF bytes / the INT4 checkpoint's bytes (its safetensors files),
* fidelity: llama.cpp's logits (f32 KV cache, one token per step) against ``load_model(ckpt)``'s exact
  float forward of the same INT4 weights: mean KL(ref || llama.cpp) and top-1 agreement over the first
  16 and over all ``--seqs`` x ``--seq-len`` positions (random token ids), and top-1 minus the native
  runtime's on the same positions with its paired standard error (``top1_minus_native_pts``),
* speed: llama.cpp's prefill / decode tok/s (median of ``--reps``, llama.cpp's default KV cache).

The same fidelity and speed are measured for ``mobilemoe.runtime.Engine`` (native INT4 backend when
built, else reference): the bar the default ``int4`` type is held to.

llama.cpp runs in a child process: if it fails or crashes (e.g. SIGILL on a CPU feature its build
assumed), that type's entry is ``{"error": "..."}`` and the other numbers are still reported.
Prints one JSON object. Timings on a shared 2-core machine are noisy.

Usage: python benchmarks/export_llamacpp.py [--preset tiny-moe|mobilemoe-s|...] [--ckpt DIR]
           [--types int4,f16,q8_0,q4_0] [--seqs 2] [--seq-len 512] [--prompt 64] [--gen 32]
           [--threads 2] [--reps 3 | 0 = fidelity only] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from mobilemoe.eval.logit_agreement import fidelity, paired_top1, reference_logits, stepwise_logits


def ckpt_bytes(ckpt: Path) -> int:
    return sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))


def measure_type(ckpt: Path, work: Path, gtype: str, seqs, ref, native_agree, args) -> dict:
    from mobilemoe.bench.llamacpp import run_in_child, time_prefill_decode
    from mobilemoe.errors import MobileMoEError
    from mobilemoe.export.gguf import export_gguf
    from mobilemoe.export.llamacpp_logits import llama_logits

    path = work / f"model-{gtype}.gguf"
    t0 = time.perf_counter()
    report = export_gguf(ckpt, path, gtype)
    row = {"bytes": path.stat().st_size, "size_x": round(path.stat().st_size / ckpt_bytes(ckpt), 3),
           "export_s": round(time.perf_counter() - t0, 2), "exact_q4_0_tensors": len(report.exact_q4_0),
           "requantized_tensors": len(report.requantized)}
    try:
        numbers, agree = fidelity(ref, [llama_logits(path, s, n_ctx=len(s) + 8)[0] for s in seqs])
        row.update(numbers, **paired_top1(agree, native_agree))
        if args.reps == 0:
            return row
        row.update({k: round(v, 1) for k, v in run_in_child(
            time_prefill_decode, str(path), args.prompt, args.gen, args.reps, args.threads,
            what=f"timing {path.name}").items()})
    except MobileMoEError as exc:  # one line in the report; the other types still count
        row["error"] = str(exc)
    return row


def measure_engine(ckpt: Path, seqs, ref, args) -> tuple[dict, np.ndarray]:
    """The native runtime's fidelity and speed, and its per-position top-1 agreement."""
    import torch

    from mobilemoe.runtime import Engine

    engine = Engine.load(ckpt, max_seq_len=max(len(seqs[0]), args.prompt + args.gen) + 8)
    row = {"backend": type(engine.backend).__name__, "size_x": 1.0}
    numbers, agree = fidelity(ref, [stepwise_logits(engine, s) for s in seqs])
    row.update(numbers)
    if args.reps == 0:
        return row, agree
    gen = torch.Generator().manual_seed(0)
    ttft, dtoks = [], []
    for _ in range(args.reps):
        engine.reset()
        ids = torch.randint(0, engine.config.vocab_size, (args.prompt,), generator=gen).tolist()
        res = engine.generate(ids, max_new_tokens=args.gen)
        ttft.append(res.ttft_s)
        dtoks.append(res.decode_tok_s)
    row.update(prefill_tok_s=round(args.prompt / statistics.median(ttft), 1),
               decode_tok_s=round(statistics.median(dtoks), 1))
    return row, agree


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny-moe")
    ap.add_argument("--ckpt", default=None, help="an existing INT4 checkpoint (skips the random one)")
    ap.add_argument("--types", default="int4,f16,q8_0,q4_0", help="comma-separated GGUF types")
    ap.add_argument("--seqs", type=int, default=2, help="random sequences for the fidelity measurement")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3, help="timing repetitions; 0 measures fidelity only")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()

    import torch

    from mobilemoe.bench.random_int4 import write_random_int4_checkpoint
    from mobilemoe.config import MobileMoEConfig, preset

    torch.set_num_threads(args.threads)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="export_llamacpp_"))
    ckpt = Path(args.ckpt) if args.ckpt else write_random_int4_checkpoint(
        preset(args.preset), work / f"{args.preset}-int4")
    vocab = MobileMoEConfig.from_json(ckpt / "config.json").vocab_size
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, vocab, (args.seq_len,), generator=gen).tolist() for _ in range(args.seqs)]
    ref = reference_logits(ckpt, seqs)
    native, native_agree = measure_engine(ckpt, seqs, ref, args)
    result = {"preset": None if args.ckpt else args.preset, "ckpt": str(ckpt), "ckpt_bytes": ckpt_bytes(ckpt),
              "positions": sum(len(r) for r in ref), "prompt": args.prompt, "gen": args.gen,
              "threads": args.threads, "mobilemoe_engine": native,
              "gguf": {t: measure_type(ckpt, work, t, seqs, ref, native_agree, args) for t in args.types.split(",")}}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
