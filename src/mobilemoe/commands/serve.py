"""``mobilemoe serve``: an OpenAI-compatible HTTP server over the INT4 runtime."""

from __future__ import annotations

import argparse
import math
import socket
import sys
from pathlib import Path

from mobilemoe.commands.generate import add_engine_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve /v1/chat/completions, /v1/completions and /v1/models (streaming as server-sent "
                    "events). One model, one request generating at a time; the others wait in a bounded "
                    "queue. The sampling flags are the defaults for requests that omit them; "
                    "--max-new-tokens is the default max_tokens.")
    add_engine_args(p)
    n = p.add_argument_group("server")
    n.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; the API has no authentication)")
    n.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    n.add_argument("--model-name", default=None,
                   help="the model id clients send and /v1/models lists (default: the checkpoint directory's name)")
    n.add_argument("--queue-size", type=int, default=16,
                   help="requests that may wait behind the one generating; more are refused with 503 (default 16)")
    n.add_argument("--request-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="give up on a request after this long, queue wait included (default 300)")
    n.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run_serve)


def _check_args(args: argparse.Namespace) -> None:
    from mobilemoe.errors import MobileMoEError

    if not 1 <= args.port <= 65535:
        raise MobileMoEError(f"--port: expected 1-65535, got {args.port}")
    if args.queue_size < 1:
        raise MobileMoEError(f"--queue-size: expected >= 1, got {args.queue_size}")
    if not (math.isfinite(args.request_timeout) and args.request_timeout > 0):
        raise MobileMoEError(f"--request-timeout: expected a positive number of seconds, got {args.request_timeout}")
    if args.model_name is not None and not args.model_name.strip():
        raise MobileMoEError("--model-name: expected a non-empty name")


def _listen(host: str, port: int) -> socket.socket:
    """Bind before the (slow) model load, so a taken port fails at once with one line."""
    from mobilemoe.errors import MobileMoEError

    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        raise MobileMoEError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    # generate's helpers (private there for now): the same flag checks, sampling defaults, offloading
    # options, engine load and stop ids, so a request answers what `generate` would
    from mobilemoe.commands.generate import checked_flags, load_engine, stop_ids
    from mobilemoe.data.chat_format import load_chat_format
    from mobilemoe.serve import ServeSettings, create_app

    _check_args(args)
    sampling, offload = checked_flags(args)
    chat_format = load_chat_format(args.model)  # before the load: a checkpoint without tokenizer fails fast
    sock = _listen(args.host, args.port)
    engine = load_engine(args, offload)
    name = args.model_name or Path(args.model).resolve().name
    settings = ServeSettings(model_name=name, max_tokens=args.max_new_tokens, sampling=sampling,
                             queue_size=args.queue_size, request_timeout_s=args.request_timeout,
                             chat_stop_ids=stop_ids(engine, chat_format, chat=True),
                             text_stop_ids=stop_ids(engine, chat_format, chat=False))
    app = create_app(engine, chat_format, settings)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"mobilemoe serve: warning: listening on {args.host}, reachable from other machines; "
              "the API has no authentication", file=sys.stderr)
    print(f"mobilemoe serve: {name!r} ({type(engine.backend).__name__}, context {engine.backend.max_seq_len}) "
          f"on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
    return 0
