"""llama.cpp vs the mobilemoe Engine on the SAME model, in one run.

Builds a random-weight INT4 checkpoint of a preset (or takes ``--ckpt``), exports it with
``mobilemoe export gguf`` (default ``--type q4_0``: attention / shared expert / embedding codes copied
exactly, routed experts re-quantized along their input axis), then times

* llama.cpp (llama-cpp-python, low-level API, architecture exaone-moe): prefill of ``--prompt`` random
  tokens and decode of ``--gen`` tokens (median of ``--reps``), and
* ``mobilemoe.runtime.Engine.load(ckpt).generate`` (native INT4 backend when built, else reference):
  its measured prefill (TTFT) and decode tok/s over the same lengths, greedy.

llama.cpp runs in a child process: if it fails or crashes (e.g. SIGILL on a CPU feature its build
assumed), ``"llama_cpp"`` is ``{"error": "..."}`` and the mobilemoe numbers are still reported.
Prints one JSON object. Numbers on a shared 2-core machine are noisy.

Usage: python benchmarks/export_llamacpp.py [--preset tiny-moe|mobilemoe-s|...] [--ckpt DIR]
           [--type q4_0|q8_0|f16] [--prompt 64] [--gen 32] [--threads 2] [--reps 3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny-moe")
    ap.add_argument("--ckpt", default=None, help="an existing checkpoint (skips the random one)")
    ap.add_argument("--type", default="q4_0", choices=["f32", "f16", "q8_0", "q4_0"])
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()

    import torch

    from mobilemoe.bench.llamacpp import run_in_child, time_prefill_decode
    from mobilemoe.bench.random_int4 import random_int4_tensors
    from mobilemoe.checkpoint import save_tensors
    from mobilemoe.config import preset
    from mobilemoe.errors import MobileMoEError
    from mobilemoe.export.gguf import export_gguf
    from mobilemoe.runtime import Engine

    torch.set_num_threads(args.threads)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="export_llamacpp_"))
    if args.ckpt:
        ckpt = Path(args.ckpt)
    else:
        ckpt = work / f"{args.preset}-int4"
        if not (ckpt / "config.json").exists():
            qcfg, tensors = random_int4_tensors(preset(args.preset))
            save_tensors(tensors, qcfg, ckpt)
            del tensors
    t0 = time.perf_counter()
    gguf_path = work / f"model-{args.type}.gguf"
    report = export_gguf(ckpt, gguf_path, args.type)
    export_s = time.perf_counter() - t0

    n_ctx = args.prompt + args.gen + 8
    try:
        llama = {k: round(v, 1) for k, v in run_in_child(
            time_prefill_decode, str(gguf_path), args.prompt, args.gen, args.reps, args.threads,
            what=f"timing {gguf_path.name}").items()}
    except MobileMoEError as exc:  # one line in the report; the mobilemoe numbers below still count
        llama = {"error": str(exc)}

    engine = Engine.load(ckpt, max_seq_len=n_ctx)
    gen = torch.Generator().manual_seed(0)
    vocab = engine.config.vocab_size
    ttft, dtoks = [], []
    for _ in range(args.reps):
        ids = torch.randint(0, vocab, (args.prompt,), generator=gen).tolist()
        res = engine.generate(ids, max_new_tokens=args.gen)
        ttft.append(res.ttft_s)
        dtoks.append(res.decode_tok_s)
    ours = {"backend": type(engine.backend).__name__, "prefill_tok_s": args.prompt / statistics.median(ttft),
            "decode_tok_s": statistics.median(dtoks)}
    print(json.dumps({"preset": None if args.ckpt else args.preset, "ckpt": str(ckpt), "gguf": str(gguf_path),
                      "gguf_type": args.type, "gguf_bytes": gguf_path.stat().st_size, "export_s": round(export_s, 2),
                      "exact_q4_0_tensors": len(report.exact_q4_0), "requantized_tensors": len(report.requantized),
                      "prompt": args.prompt, "gen": args.gen, "threads": args.threads,
                      "llama_cpp": llama,
                      "mobilemoe_engine": {k: (round(v, 1) if isinstance(v, float) else v) for k, v in ours.items()}},
                     indent=2))


if __name__ == "__main__":
    main()
