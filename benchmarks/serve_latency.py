"""The server's overhead: TTFT and decode tok/s through ``mobilemoe serve`` vs ``mobilemoe generate``.

    python benchmarks/serve_latency.py                      # runs/demo/int4 if present, else a tiny random model
    python benchmarks/serve_latency.py --model DIR --max-tokens 64 --repeats 5 --json

One run, alternating: ``generate --json`` (in process; its TTFT is the prefill, its tok/s the decode
steps) and a streamed ``/v1/completions`` through the real ``openai`` client against a ``mobilemoe
serve`` subprocess on loopback (TTFT: request sent -> first text chunk; tok/s: the remaining
completion tokens over the time to the last chunk). Same prompt, greedy, same token budget, so both
produce the same tokens. Medians over ``--repeats`` after one warm-up each.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

PROMPT = "def read_config(path):\n    "
DEMO = Path("runs/demo/int4")


def tiny_model(root: Path) -> Path:
    """A seeded random tiny-moe INT4 checkpoint with a small BPE tokenizer (when there is no demo model)."""
    from mobilemoe.checkpoint import save_checkpoint
    from mobilemoe.config import preset
    from mobilemoe.data.tokenizer import train_bpe
    from mobilemoe.model import MobileMoEForCausalLM
    from mobilemoe.quant import quantize_checkpoint

    tok = train_bpe([Path(__file__).read_text()] * 3, vocab_size=512)
    model = MobileMoEForCausalLM(preset("tiny-moe", vocab_size=tok.vocab_size, max_position_embeddings=512))
    model.reset_parameters(seed=0)
    save_checkpoint(model, root / "float")
    tok.save(root / "float")
    quantize_checkpoint(root / "float", root / "tiny-int4")
    return root / "tiny-int4"


def run_generate(model: Path, max_tokens: int) -> dict:
    from mobilemoe.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(["generate", "--model", str(model), "--prompt", PROMPT, "--max-new-tokens", str(max_tokens), "--json"])
    rec = json.loads(out.getvalue())
    return {"ttft_ms": rec["ttft_s"] * 1e3, "decode_tok_s": rec["decode_tok_s"], "tokens": rec["generated_tokens"]}


def run_server_request(client, name: str, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    first = last = None
    tokens = 0
    for chunk in client.completions.create(model=name, prompt=PROMPT, max_tokens=max_tokens, temperature=0,
                                           stream=True, stream_options={"include_usage": True}):
        now = time.perf_counter()
        if chunk.choices and chunk.choices[0].text:
            first = first or now
            last = now
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    decode = (tokens - 1) / (last - first) if tokens > 1 and last > first else 0.0
    return {"ttft_ms": round(((first or time.perf_counter()) - t0) * 1e3, 2), "decode_tok_s": round(decode, 1),
            "tokens": tokens}


@contextlib.contextmanager
def server(model: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "mobilemoe.cli", "serve", "--model", str(model), "--port",
                             str(port), "--log-level", "warning", "--model-name", "bench"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        for _ in range(600):
            if proc.poll() is not None:
                raise SystemExit(f"the server exited: {proc.stderr.read()}")
            try:
                urllib.request.urlopen(f"{base}/models", timeout=2).close()
                break
            except OSError:
                time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def median_row(runs: list[dict]) -> dict:
    return {k: round(statistics.median(r[k] for r in runs), 2) for k in ("ttft_ms", "decode_tok_s", "tokens")}


def main() -> int:
    import openai

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help=f"INT4 checkpoint (default {DEMO} if present)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or (DEMO if (DEMO / "config.json").is_file() else tiny_model(Path(tmp)))
        gen, srv = [], []
        with server(model) as base, openai.OpenAI(base_url=base, api_key="unused", max_retries=0) as client:
            run_generate(model, args.max_tokens), run_server_request(client, "bench", args.max_tokens)  # warm-up
            for _ in range(args.repeats):
                gen.append(run_generate(model, args.max_tokens))
                srv.append(run_server_request(client, "bench", args.max_tokens))
    g, s = median_row(gen), median_row(srv)
    record = {"model": str(model), "prompt": PROMPT, "max_tokens": args.max_tokens, "repeats": args.repeats,
              "generate": g, "server": s,
              "overhead": {"ttft_ms": round(s["ttft_ms"] - g["ttft_ms"], 2),
                           "decode_tok_s_ratio": round(s["decode_tok_s"] / g["decode_tok_s"], 3)
                           if g["decode_tok_s"] else None},
              "runs": {"generate": gen, "server": srv}}
    if args.json:
        print(json.dumps(record, indent=2))
        return 0
    print(f"model {model}, {args.max_tokens} tokens, median of {args.repeats}")
    print(f"| path | TTFT (ms) | decode tok/s | tokens |\n|---|---|---|---|")
    for label, row in (("mobilemoe generate", g), ("mobilemoe serve (HTTP, SSE)", s)):
        print(f"| {label} | {row['ttft_ms']:.1f} | {row['decode_tok_s']:.1f} | {row['tokens']:.0f} |")
    print(f"server overhead: TTFT +{record['overhead']['ttft_ms']:.1f} ms, decode x{record['overhead']['decode_tok_s_ratio']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
