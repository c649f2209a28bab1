"""``mobilemoe info``: the accounting table of a preset or config."""

from __future__ import annotations

import argparse

from mobilemoe.commands.common import print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="parameter / FLOP / INT4-byte accounting of a preset or config",
                       description="Print total and active parameters, INT4 and BF16 weight bytes, weight "
                                   "bytes read per decoded token, FLOPs per token and KV-cache bytes.")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--preset", help="a built-in preset name")
    group.add_argument("--config", help="path to a config.json or a checkpoint directory")
    group.add_argument("--list", action="store_true", help="list the built-in presets")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def _human(n: float, unit: str = "") -> str:
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= factor:
            return f"{n / factor:.3f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def rows(acc) -> list[tuple[str, str]]:
    gib = 1024**3
    return [
        ("total params", _human(acc.total_params)),
        ("active params / token", _human(acc.active_params)),
        ("embedding params", _human(acc.embedding_params)),
        ("routed expert params", _human(acc.expert_params)),
        ("layers (MoE / dense)", f"{acc.moe_layers} / {acc.dense_layers}"),
        ("BF16 weights", f"{_human(acc.bf16_bytes, 'B')} ({acc.bf16_bytes / gib:.3f} GiB)"),
        ("INT4 weights (g32)", f"{_human(acc.int4_bytes, 'B')} ({acc.int4_bytes / gib:.3f} GiB)"),
        ("INT4 bytes read / decoded token", _human(acc.int4_decode_bytes_per_token, "B")),
        ("decode FLOPs / token @256", _human(acc.decode_flops_per_token_256)),
        ("decode FLOPs / token @2048", _human(acc.decode_flops_per_token_2048)),
        ("prefill FLOPs / token @1024", _human(acc.prefill_flops_per_token_1024)),
        ("KV cache @8192 (bf16)", _human(acc.kv_cache_bytes_8192, "B")),
    ]


def run(args: argparse.Namespace) -> int:
    from mobilemoe.accounting import account
    from mobilemoe.config import PRESETS, ConfigError, load_config

    if args.list:
        names = sorted(PRESETS)
        print_json(names) if args.json else print("\n".join(names))
        return 0
    if args.preset is None and args.config is None:
        raise ConfigError("give --preset NAME, --config PATH or --list")
    cfg = load_config(args.preset, args.config)
    acc = account(cfg)
    name = args.preset or args.config
    if args.json:
        print_json({"model": name, "config": cfg.to_dict(), "accounting": acc.to_dict()})
        return 0
    kind = f"MoE {cfg.num_local_experts} x {cfg.intermediate_size} top-{cfg.num_experts_per_tok}" if cfg.is_moe else "dense"
    print(f"{name}: {cfg.num_hidden_layers} layers, d {cfg.hidden_size}, {kind}, vocab {cfg.vocab_size}")
    width = max(len(k) for k, _ in rows(acc))
    for key, value in rows(acc):
        print(f"  {key:<{width}}  {value}")
    return 0
