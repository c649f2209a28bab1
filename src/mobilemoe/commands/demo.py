"""``mobilemoe demo``: the main job of ``make run`` until training and the runtime land.

Builds a tiny MobileMoE, runs a forward pass and a KV-cached greedy decode on a snippet of the
embedded default corpus (the running Python's standard library), checks that cached decoding
agrees with a full forward, and prints the accounting of the tiny model and the published tiers.
"""

from __future__ import annotations

import argparse
import time

from mobilemoe.commands.common import print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="end-to-end smoke demonstration on a tiny model (the `make run` job)",
                       description=__doc__.split("\n\n")[1])
    p.add_argument("--preset", default="tiny-moe", help="model preset (default: tiny-moe)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokens", type=int, default=16, help="tokens to decode (default 16)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def _stdlib_snippet(n_bytes: int) -> bytes:
    import inspect
    import json as json_module

    return inspect.getsource(json_module).encode()[:n_bytes]


def run(args: argparse.Namespace) -> int:
    import torch

    from mobilemoe.accounting import account
    from mobilemoe.config import preset
    from mobilemoe.model import MobileMoEForCausalLM

    torch.manual_seed(args.seed)
    cfg = preset(args.preset)
    model = MobileMoEForCausalLM(cfg).eval()
    # Byte-level ids (mod vocab) from real text until the tokenizer and trained weights exist.
    prompt = torch.tensor([list(_stdlib_snippet(64))]) % cfg.vocab_size
    with torch.no_grad():
        t0 = time.perf_counter()
        full = model(prompt, return_router=True)
        forward_s = time.perf_counter() - t0
        cache = model.new_cache(1, prompt.shape[1] + args.tokens)
        logits = model(prompt, 0, cache, last_only=True).logits
        generated = []
        t0 = time.perf_counter()
        for _ in range(args.tokens):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            generated.append(int(nxt))
            logits = model(nxt, cache.length, cache).logits
        decode_s = time.perf_counter() - t0
        seq = torch.cat([prompt, torch.tensor([generated])], dim=1)
        check = model(seq[:, :-1]).logits[:, prompt.shape[1] - 1:].argmax(-1)
    agree = check[0].tolist() == generated
    experts_used = sorted({int(e) for r in full.router for e in r.expert_ids.flatten()})
    result = {
        "preset": args.preset,
        "accounting": account(cfg).to_dict(),
        "published_tiers": {name: account(preset(name)).to_dict() for name in ("mobilemoe-s", "mobilemoe-l")},
        "prompt_tokens": prompt.shape[1],
        "forward_ms": round(forward_s * 1e3, 2),
        "decode_tok_s": round(args.tokens / decode_s, 1),
        "generated_ids": generated,
        "cached_decode_matches_full_forward": agree,
        "distinct_experts_used": len(experts_used),
    }
    if args.json:
        print_json(result)
    else:
        from mobilemoe.commands.info import rows

        print(f"mobilemoe demo: {args.preset} (random weights; training lands with the training issue)")
        for name in ["tiny", "mobilemoe-s", "mobilemoe-l"]:
            acc = account(cfg if name == "tiny" else preset(name))
            print(f"\n{args.preset if name == 'tiny' else name}:")
            for key, value in rows(acc)[:8]:
                print(f"  {key:<32} {value}")
        print(f"\nforward of {prompt.shape[1]} tokens: {result['forward_ms']} ms; "
              f"greedy KV-cached decode: {result['decode_tok_s']} tok/s")
        print(f"cached decode matches full forward: {agree}; experts used: {len(experts_used)}/{cfg.num_local_experts}")
    return 0 if agree else 1
