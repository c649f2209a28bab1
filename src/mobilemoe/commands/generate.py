"""``mobilemoe generate`` and ``mobilemoe chat``: text generation with the INT4 runtime.

``generate --model`` also takes an exported ``.pte`` (ExecuTorch runtime) or ``.gguf`` (llama.cpp, in a
child process) with the same sampling flags and ``--json`` record (its ``artifact`` says which); an
artifact carries no mobilemoe tokenizer, so it takes ``--prompt-ids``.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from mobilemoe.commands.common import print_json


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="checkpoint directory (INT4 for the native runtime), or an exported .pte (run by the "
                        "ExecuTorch runtime) or .gguf (run by llama.cpp in a child process); artifacts take "
                        "--prompt-ids, and neither --backend nor expert offloading")
    p.add_argument("--backend", default="auto", choices=["auto", "native", "reference"],
                   help="auto: native for INT4 checkpoints when the extension is built, else reference "
                        "(checkpoint directories only)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="KV-cache length (default and bound: the model's limit; for a .pte its static cache, "
                        "for a .gguf its context length)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    o = p.add_argument_group("expert offloading (native runtime on a checkpoint directory, MoE models)")
    o.add_argument("--cache-experts", type=int, metavar="C",
                   help="keep routed experts on storage and cache C per MoE layer in RAM (top-k <= C <= experts)")
    o.add_argument("--max-memory", metavar="SIZE",
                   help="offload experts and cache as many as fit SIZE (e.g. 300MB, 1.5GB) of model memory: "
                        "non-expert weights + KV cache + expert slots (the Python process adds its own)")
    o.add_argument("--expert-store", metavar="DIR",
                   help="expert store directory (default MODEL/expert-store; written on first use)")
    o.add_argument("--keep-page-cache", action="store_true",
                   help="let the OS page cache keep expert reads (default: drop them, so misses hit storage)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt",
                       description="Prefill a prompt, then decode with greedy / temperature / top-k / top-p "
                                   "sampling, streaming tokens as they come. --model is a checkpoint directory, an "
                                   "ExecuTorch .pte or a llama.cpp .gguf: the same flags and --json record "
                                   "(an artifact takes --prompt-ids).")
    add_engine_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (needs tokenizer.json in the checkpoint)")
    src.add_argument("--prompt-file", metavar="PATH", help="read the prompt text from a UTF-8 file (as is)")
    src.add_argument("--prompt-ids", help="comma-separated token ids")
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt as one user turn of the checkpoint's chat template (its chat_template "
                        "when it has one, else the mobilemoe template)")
    p.add_argument("--system", default=None, help="with --chat: a system message before the user turn")
    p.add_argument("--json", action="store_true", help="print a JSON record instead of streaming text")
    p.set_defaults(func=run_generate)

    c = sub.add_parser("chat", help="interactive chat with the chat template",
                       description="Read user turns from standard input (an empty line or EOF ends), answer each "
                                   "with the model; the conversation so far is the prompt of the next turn.")
    add_engine_args(c)
    c.add_argument("--system", default=None, help="optional system message")
    c.set_defaults(func=run_chat)


def checked_flags(args):
    """Sampling and offload settings, checked before anything loads: a bad flag should not cost a model
    load (or an expert-store build)."""
    from mobilemoe.errors import MobileMoEError
    from mobilemoe.runtime.sampling import SamplingParams

    if args.max_seq_len is not None and args.max_seq_len < 1:
        raise MobileMoEError(f"--max-seq-len: expected a positive number of tokens, got {args.max_seq_len}")
    if args.max_new_tokens < 0:
        raise MobileMoEError(f"--max-new-tokens: expected >= 0, got {args.max_new_tokens}")
    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    _check_artifact_flags(args)
    return sampling, _offload(args)


_CHECKPOINT_ONLY = (("cache_experts", "--cache-experts"), ("max_memory", "--max-memory"),
                    ("expert_store", "--expert-store"), ("keep_page_cache", "--keep-page-cache"))


def _check_artifact_flags(args) -> None:
    """An exported artifact runs in its own runtime as exported: the checkpoint runtime's flags do not
    apply, and giving one is an error rather than a silently ignored setting."""
    from mobilemoe.errors import MobileMoEError
    from mobilemoe.runtime.artifacts import artifact_kind

    kind = artifact_kind(args.model)
    if kind == "checkpoint":
        return
    given = [flag for attr, flag in _CHECKPOINT_ONLY if getattr(args, attr, None)]
    if args.backend != "auto":
        given.insert(0, f"--backend {args.backend}")
    if given:
        raise MobileMoEError(f"{args.model}: {', '.join(given)} applies to checkpoint directories (the native "
                             f"runtime), not to a .{kind}, which runs in its own runtime")


def _artifact(model: str) -> str:
    from mobilemoe.runtime.artifacts import artifact_kind

    return artifact_kind(model)


def load_engine(args, offload):
    """The engine `generate`, `chat` and `serve` run on, from the shared engine flags."""
    from mobilemoe.runtime.engine import Engine

    return Engine.load(args.model, max_seq_len=args.max_seq_len, backend=args.backend, offload=offload)


_SIZE = re.compile(r"\s*((?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?)\s*([kmgt]i?b|b)?\s*", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_size(text: str) -> int:
    """'300MB', '1.5GB', '512MiB', '2e9' -> bytes: a finite, positive decimal number with an optional
    unit (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), at least one byte."""
    from mobilemoe.errors import MobileMoEError

    m = _SIZE.fullmatch(text)
    if m is None:  # also refuses nan, inf, signs and hex, which float() would take
        raise MobileMoEError(f"--max-memory: expected a size like 300MB, 1.5GB or 512MiB, got {text!r}")
    value = float(m.group(1)) * _UNITS[(m.group(2) or "b").lower()]
    if not 1 <= value < 2**63:
        raise MobileMoEError(f"--max-memory: expected between 1 byte and 8 EiB, got {text!r}")
    return int(value)


def read_prompt_file(path: str) -> str:
    """The text of a prompt file, as is; one line naming the file and the byte offset if it is not UTF-8."""
    from mobilemoe.errors import MobileMoEError

    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise MobileMoEError(f"--prompt-file {path}: cannot read it: {exc.strerror or exc}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MobileMoEError(f"--prompt-file {path}: not valid UTF-8 at byte {exc.start} "
                             f"(0x{raw[exc.start]:02x}: {exc.reason})") from None


def checked_text(text: str, where: str) -> str:
    """``text`` unless it carries undecodable input bytes (Python keeps them from argv and stdin as lone
    surrogates, which no tokenizer can encode): then one line naming ``where`` and the byte offset."""
    from mobilemoe.errors import MobileMoEError

    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # text[:start] is valid, so its UTF-8 length is the byte offset
        raise MobileMoEError(f"{where}: not valid UTF-8 at byte {len(text[:exc.start].encode('utf-8'))}") from None
    return text


def _offload(args):
    from mobilemoe.errors import MobileMoEError
    from mobilemoe.runtime.offload import ExpertOffload

    if args.cache_experts is None and args.max_memory is None:
        if args.expert_store:
            raise MobileMoEError("--expert-store needs --cache-experts or --max-memory")
        return None

    if args.cache_experts is not None and args.max_memory is not None:
        raise MobileMoEError("give --cache-experts or --max-memory, not both")
    return ExpertOffload(capacity=args.cache_experts,
                         max_memory=parse_size(args.max_memory) if args.max_memory else None,
                         store_dir=args.expert_store, drop_page_cache=not args.keep_page_cache)


def _chat_format(model: str, needed_for: str | None):
    """The checkpoint's :class:`~mobilemoe.data.chat_format.ChatFormat` (its tokenizer, template and stop
    ids), or ``None`` when it has no tokenizer.json and ``needed_for`` is ``None`` (token-id prompts)."""
    from mobilemoe.data.chat_format import load_chat_format
    from mobilemoe.errors import MobileMoEError

    if not (Path(model) / "tokenizer.json").is_file():
        if needed_for is None:
            return None
        raise MobileMoEError(f"{model}: no tokenizer.json ({needed_for} needs the checkpoint's tokenizer; "
                             "token ids can be given with --prompt-ids)")
    return load_chat_format(model)


def stop_ids(engine, fmt, chat: bool) -> list[int]:
    """Every id that ends a reply: config.json's eos_token_id (an int or a list) and, with a tokenizer,
    the generation config's, the tokenizer's EOS and (for chat) the template's turn end."""
    eos = engine.config.eos_token_id
    stops = eos if isinstance(eos, list) else ([eos] if eos is not None else [])
    if fmt is not None:
        stops = stops + (fmt.stop_ids if chat else fmt.eos_ids)
    # (an artifact's eos comes in engine.config: a .gguf's tokenizer.ggml.eos_token_id)
    return list(dict.fromkeys(stops))


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


def _parse_ids(text: str) -> list[int]:
    from mobilemoe.errors import MobileMoEError

    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise MobileMoEError(f"--prompt-ids: expected comma-separated integers, got {text!r}") from None


def run_generate(args: argparse.Namespace) -> int:
    from mobilemoe.errors import MobileMoEError

    text = None  # the prompt, read and checked before the model loads
    if args.prompt_file is not None:
        text = read_prompt_file(args.prompt_file)
    elif args.prompt is not None:
        text = checked_text(args.prompt, "--prompt")
    if args.system is not None and (not args.chat or text is None):
        raise MobileMoEError("--system needs --chat and a text prompt (--prompt or --prompt-file)")
    sampling, offload = checked_flags(args)
    kind = _artifact(args.model)
    if kind != "checkpoint" and (text is not None or args.chat):
        raise MobileMoEError(f"{args.model}: a .{kind} carries no mobilemoe tokenizer or chat template: give "
                             "token ids with --prompt-ids (and no --chat), or use the checkpoint directory")
    # the tokenizer and the template are checked before the model loads, too
    fmt = _chat_format(args.model, None if text is None else ("--chat" if args.chat else "a text prompt"))
    if args.prompt_ids is not None:  # taken as is (with --chat: the chat stop ids apply)
        prompt = _parse_ids(args.prompt_ids)
    elif args.chat:
        prompt = fmt.prompt_ids(_system(args) + [{"role": "user", "content": text}])
    else:
        prompt = fmt.text_ids(text)
    engine = load_engine(args, offload)
    streamer = None if args.json else _Streamer(engine.tokenizer)
    result = engine.generate(prompt, args.max_new_tokens, sampling, stop_ids(engine, fmt, args.chat),
                             on_token=streamer)
    record = {
        "prompt_tokens": len(prompt), "prompt_ids": list(prompt), "generated_tokens": len(result.ids),
        "ids": result.ids,
        "stopped_by": result.stopped_by, "ttft_s": round(result.ttft_s, 4),
        "prefill_tok_s": round(result.prefill_tok_s, 1), "decode_tok_s": round(result.decode_tok_s, 1),
        "backend": type(engine.backend).__name__, "artifact": kind,
    }
    if getattr(engine.backend, "capacity", None) is not None:
        record["offload"] = engine.backend.offload_stats()
    if fmt is not None:
        record["text"] = fmt.tokenizer.decode(result.ids)
        if args.chat:
            record["chat_template"] = fmt.source
    if args.json:
        print_json(record)
    else:
        print(f"\n[{len(prompt)} prompt tokens, TTFT {result.ttft_s * 1e3:.0f} ms; {len(result.ids)} tokens at "
              f"{result.decode_tok_s:.1f} tok/s; {record['backend']}]", file=sys.stderr)
        if "offload" in record:
            st = record["offload"]
            print(f"[experts offloaded, {st['capacity']} cached per layer: {st['hits']} hits, {st['misses']} misses, "
                  f"{st['bytes_read'] / 1e6:.1f} MB read in {st['read_seconds'] * 1e3:.0f} ms]", file=sys.stderr)
    return 0


def _system(args: argparse.Namespace) -> list[dict[str, str]]:
    """The ``--system`` message as a conversation prefix (empty without one)."""
    return [{"role": "system", "content": checked_text(args.system, "--system")}] if args.system else []


def run_chat(args: argparse.Namespace) -> int:
    from mobilemoe.errors import MobileMoEError

    sampling, offload = checked_flags(args)
    if _artifact(args.model) != "checkpoint":
        raise MobileMoEError(f"{args.model}: chat needs the checkpoint's tokenizer and chat template, which an "
                             "exported artifact does not carry: chat on the checkpoint directory, or run "
                             "`mobilemoe generate --prompt-ids` on the artifact")
    fmt = _chat_format(args.model, "chat")
    messages = _system(args)
    engine = load_engine(args, offload)
    stops = stop_ids(engine, fmt, chat=True)
    interactive = sys.stdin.isatty()
    turn = 0
    while True:
        if interactive:
            sys.stdout.write("you> ")
            sys.stdout.flush()
        turn += 1
        try:
            line = checked_text(sys.stdin.readline(), f"standard input, line {turn}")
        except UnicodeDecodeError as exc:  # a strict stdin decoder
            raise MobileMoEError(f"standard input, line {turn}: not valid UTF-8 ({exc.reason})") from None
        if not line.strip():
            return 0
        messages.append({"role": "user", "content": line.rstrip("\n")})
        if interactive:
            sys.stdout.write("model> ")
        streamer = _Streamer(fmt.tokenizer)
        result = engine.generate(fmt.prompt_ids(messages), args.max_new_tokens, sampling, stops, on_token=streamer)
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": fmt.tokenizer.decode(result.ids)})
