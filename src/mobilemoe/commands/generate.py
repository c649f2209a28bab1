"""``mobilemoe generate`` and ``mobilemoe chat``: text generation with the INT4 runtime."""

from __future__ import annotations

import argparse
import sys

from mobilemoe.commands.common import print_json


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory (INT4 for the native runtime)")
    p.add_argument("--backend", default="auto", choices=["auto", "native", "reference"],
                   help="auto: native for INT4 checkpoints when the extension is built, else reference")
    p.add_argument("--max-seq-len", type=int, default=None, help="KV-cache length (default: the model's limit)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt",
                       description="Prefill a prompt, then decode with greedy / temperature / top-k / top-p "
                                   "sampling, streaming tokens as they come.")
    add_engine_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (needs tokenizer.json in the checkpoint)")
    src.add_argument("--prompt-ids", help="comma-separated token ids")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as one user turn of the chat template")
    p.add_argument("--json", action="store_true", help="print a JSON record instead of streaming text")
    p.set_defaults(func=run_generate)

    c = sub.add_parser("chat", help="interactive chat with the chat template",
                       description="Read user turns from standard input (an empty line or EOF ends), answer each "
                                   "with the model; the conversation so far is the prompt of the next turn.")
    add_engine_args(c)
    c.add_argument("--system", default=None, help="optional system message")
    c.set_defaults(func=run_chat)


def _engine_and_sampling(args):
    from mobilemoe.runtime.engine import Engine
    from mobilemoe.runtime.sampling import SamplingParams

    engine = Engine.load(args.model, max_seq_len=args.max_seq_len, backend=args.backend)
    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    return engine, sampling


def _stop_ids(engine, chat: bool) -> list[int]:
    stops = []
    eos = engine.config.eos_token_id
    stops += eos if isinstance(eos, list) else ([eos] if eos is not None else [])
    tok = engine.tokenizer
    if tok is not None:
        stops.append(tok.eos_id)
        if chat:
            from mobilemoe.data.tokenizer import END

            stops.append(tok.require_id(END))
    return stops


class _Streamer:
    """Prints the text of a growing token list as it changes (BPE pieces can span tokens)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.ids, self.shown = tokenizer, [], ""

    def __call__(self, token: int) -> None:
        self.ids.append(token)
        if self.tokenizer is None:
            sys.stdout.write(f"{token} ")
        else:
            text = self.tokenizer.decode(self.ids)
            sys.stdout.write(text[len(self.shown):])
            self.shown = text
        sys.stdout.flush()


def run_generate(args: argparse.Namespace) -> int:
    from mobilemoe.errors import MobileMoEError

    engine, sampling = _engine_and_sampling(args)
    if args.prompt_ids is not None:
        try:
            prompt = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
        except ValueError:
            raise MobileMoEError(f"--prompt-ids: expected comma-separated integers, got {args.prompt_ids!r}") from None
    elif args.chat:
        from mobilemoe.data.chat import encode_prompt

        if engine.tokenizer is None:
            raise MobileMoEError("--chat needs tokenizer.json in the checkpoint")
        prompt = encode_prompt(engine.tokenizer, [{"role": "user", "content": args.prompt}])
    else:
        prompt = engine.encode(args.prompt)
    streamer = None if args.json else _Streamer(engine.tokenizer)
    result = engine.generate(prompt, args.max_new_tokens, sampling, _stop_ids(engine, args.chat), on_token=streamer)
    record = {
        "prompt_tokens": len(prompt), "generated_tokens": len(result.ids), "ids": result.ids,
        "stopped_by": result.stopped_by, "ttft_s": round(result.ttft_s, 4),
        "prefill_tok_s": round(result.prefill_tok_s, 1), "decode_tok_s": round(result.decode_tok_s, 1),
        "backend": type(engine.backend).__name__,
    }
    if engine.tokenizer is not None:
        record["text"] = engine.tokenizer.decode(result.ids)
    if args.json:
        print_json(record)
    else:
        print(f"\n[{len(prompt)} prompt tokens, TTFT {result.ttft_s * 1e3:.0f} ms; {len(result.ids)} tokens at "
              f"{result.decode_tok_s:.1f} tok/s; {record['backend']}]", file=sys.stderr)
    return 0


def run_chat(args: argparse.Namespace) -> int:
    from mobilemoe.data.chat import encode_prompt
    from mobilemoe.errors import MobileMoEError

    engine, sampling = _engine_and_sampling(args)
    if engine.tokenizer is None:
        raise MobileMoEError("chat needs tokenizer.json in the checkpoint")
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            sys.stdout.write("you> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line.strip():
            return 0
        messages.append({"role": "user", "content": line.rstrip("\n")})
        if interactive:
            sys.stdout.write("model> ")
        streamer = _Streamer(engine.tokenizer)
        result = engine.generate(encode_prompt(engine.tokenizer, messages), args.max_new_tokens, sampling,
                                 _stop_ids(engine, chat=True), on_token=streamer)
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": engine.tokenizer.decode(result.ids)})
