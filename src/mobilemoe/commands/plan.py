"""``mobilemoe plan``: the best MoE architectures for a device's memory / compute budget."""

from __future__ import annotations

import argparse

from mobilemoe.commands.common import number_arg as _float


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "plan", help="pick the best architectures for a memory (INT4 GiB) / FLOPs budget with the scaling law",
        description="Enumerate MoE and dense architectures, keep those whose INT4 weights fit --memory-gb "
                    "(GiB; --decimal-gb for 1e9 bytes) and whose decode FLOPs/token fit --flops-per-token, "
                    "predict their loss at --tokens training tokens with the scaling law (--law, or the "
                    "shipped DEFAULT constants), and print the Pareto-optimal ones (loss, INT4 bytes, FLOPs) "
                    "ranked by predicted loss, with a roofline speed projection for --device.")
    p.add_argument("--memory-gb", type=_float, metavar="GB", help="budget for the INT4 weights, GiB")
    p.add_argument("--flops-per-token", type=_float, metavar="X",
                   help="budget for decode FLOPs per token (at --context)")
    p.add_argument("--tokens", type=_float, default=6e12, metavar="D", help="planned training tokens (default 6e12)")
    p.add_argument("--device", metavar="NAME", help="device profile name (see --list-devices) or a profile YAML path")
    p.add_argument("--profiles-dir", metavar="DIR", action="append",
                   help="extra directory of device profile YAML files (searched first; repeatable)")
    p.add_argument("--list-devices", action="store_true", help="list the device profiles found and exit")
    p.add_argument("--law", metavar="FILE", help="a fitted law (YAML/JSON from `mobilemoe sweep --fit`); "
                                                 "default: the shipped default constants")
    p.add_argument("--leave-gb", type=_float, metavar="GB",
                   help="with --device: budget = device RAM minus this reserve, counting weights + KV cache")
    p.add_argument("--count-kv", action="store_true", help="count the bf16 KV cache at --context in the memory budget")
    p.add_argument("--decimal-gb", action="store_true", help="read --memory-gb as 1e9 bytes instead of GiB")
    p.add_argument("--context", type=int, default=2048, help="context length for decode FLOPs / KV cache (2048)")
    p.add_argument("--prompt", type=int, default=1024, help="prompt length for the prefill projection (1024)")
    p.add_argument("--experts", metavar="LIST", help="coarse expert counts E to consider (default 1,2,4,6,8,12,16,24,32)")
    p.add_argument("--top-k", metavar="LIST", help="coarse top-k values (default 1,2)")
    p.add_argument("--granularity", metavar="LIST", help="granularities g (default 1,2,4,8,16)")
    p.add_argument("--vocab", type=int, help="vocabulary size (default 128256, the Llama 3 tokenizer)")
    p.add_argument("--no-dense", action="store_true", help="consider MoE architectures only")
    p.add_argument("--top", type=int, default=10, help="how many ranked architectures to print (10)")
    p.add_argument("--compare-tiers", action="store_true",
                   help="plan at the published S/M/L INT4 budgets (and FLOPs) and compare with the tiers")
    p.add_argument("--tiers-only", action="store_true",
                   help="only check the released tiers (S/M/L) against the budget: which fit, how fast")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--plot", metavar="PNG", help="write the loss-vs-INT4-memory frontier (MoE vs dense)")
    p.set_defaults(func=run)


def _spec(args):
    import dataclasses

    from mobilemoe.scaling.planner import DEFAULT_PLANNER_SPACE
    from mobilemoe.scaling.space import parse_int_list

    spec = DEFAULT_PLANNER_SPACE
    changes = {}
    if args.experts:
        changes["experts"] = parse_int_list(args.experts, "--experts")
    if args.top_k:
        changes["top_k"] = parse_int_list(args.top_k, "--top-k")
    if args.granularity:
        changes["granularity"] = parse_int_list(args.granularity, "--granularity")
    if args.no_dense:
        changes["include_dense"] = False
    if args.vocab is not None:
        if args.vocab < 1:
            from mobilemoe.errors import MobileMoEError

            raise MobileMoEError(f"--vocab must be a positive integer, got {args.vocab}")
        changes["vocab"] = args.vocab
    return dataclasses.replace(spec, **changes) if changes else spec


def _compare_tiers(args, law, spec) -> int:
    from mobilemoe.commands.common import print_json
    from mobilemoe.scaling.planner import DEFAULT_NOTE, tier_comparison

    rows = tier_comparison(law, args.tokens, spec, context=args.context, prompt=args.prompt)
    if args.json:
        print_json({"law_default": law.is_default, "rows": rows})
        return 0
    if law.is_default:
        print(f"NOTE: {DEFAULT_NOTE}")
    print(f"{'tier':<12} {'budget':<13} {'tier act/total':>15} {'plan act/total':>15} {'ratio':>11}  plan")
    for r in rows:
        print(f"{r['tier']:<12} {r['budget']:<13} {r['tier_active'] / 1e9:>6.3f}/{r['tier_total'] / 1e9:<7.3f}  "
              f"{r['plan_active'] / 1e9:>6.3f}/{r['plan_total'] / 1e9:<7.3f}  {r['active_ratio']:.2f}/{r['total_ratio']:.2f}"
              f"  {r['plan_arch']} ({r['plan_int4_gib']:.3f} GiB)")
    return 0


def _tiers_only(args, device) -> int:
    from mobilemoe.commands.common import print_json
    from mobilemoe.errors import MobileMoEError
    from mobilemoe.scaling.planner import GIB, tier_fit

    count_kv = args.count_kv
    if args.leave_gb is not None:
        if device is None or device.memory_gb is None:
            raise MobileMoEError("--leave-gb needs --device with a profile that gives memory_gb")
        gib = device.memory_gb - args.leave_gb
        if args.memory_gb is not None:
            gib = min(gib, args.memory_gb)
        count_kv = True
    elif args.memory_gb is not None:
        gib = args.memory_gb * (1e9 / GIB if args.decimal_gb else 1.0)
    else:
        raise MobileMoEError("--tiers-only needs --memory-gb or --device with --leave-gb")
    if gib <= 0:
        raise MobileMoEError(f"the budget is {gib:.2f} GiB: nothing is left for the model")
    rows = tier_fit(int(gib * GIB), device, count_kv, args.context, args.prompt)
    if args.json:
        print_json({"budget_gib": gib, "counts_kv_cache": count_kv, "tiers": rows})
        return 0
    what = "INT4 weights + KV cache at %d tokens" % args.context if count_kv else "INT4 weights"
    print(f"budget: {gib:.2f} GiB for {what}")
    for r in rows:
        mark = "RECOMMENDED" if r["recommended"] else ("fits" if r["fits"] else "too big")
        speed = ""
        if "speed" in r:
            speed = (f", ~{r['speed']['decode_tok_s']:.0f} tok/s decode, ~{r['speed']['prefill_tok_s']:.0f} tok/s "
                     f"prefill, {r['speed']['load_s']:.1f} s load ({r['speed']['device']}, roofline)")
        print(f"  {r['tier']:<12} {r['memory_gib']:.2f} GiB  {mark:<11}  {r['active_params'] / 1e9:.2f}B active / "
              f"{r['total_params'] / 1e9:.2f}B total{speed}")
    if not any(r["fits"] for r in rows):
        smallest = min(rows, key=lambda r: r["memory_gib"])
        raise MobileMoEError(f"no released tier fits {gib:.2f} GiB: the smallest ({smallest['tier']}) needs "
                             f"{smallest['memory_gib']:.2f} GiB")
    return 0


def run(args: argparse.Namespace) -> int:
    from mobilemoe.commands.common import print_json
    from mobilemoe.scaling.law import default_law, load_law
    from mobilemoe.scaling.planner import format_table, plan, plot_frontier
    from mobilemoe.scaling.profiles import get_profile, list_profiles

    if args.list_devices:
        profiles = list_profiles(args.profiles_dir)
        if args.json:
            print_json({n: p.to_dict() for n, p in profiles.items()})
        else:
            for n, p in sorted(profiles.items()):
                print(f"{n:<18} {p.description}  [{p.path}]")
        return 0
    law = load_law(args.law) if args.law else default_law()
    spec = _spec(args)
    if args.compare_tiers:
        return _compare_tiers(args, law, spec)
    device = get_profile(args.device, args.profiles_dir) if args.device else None
    if args.tiers_only:
        return _tiers_only(args, device)
    result = plan(memory_gb=args.memory_gb, flops_per_token=args.flops_per_token, tokens=args.tokens, law=law,
                  device=device, spec=spec, decimal_gb=args.decimal_gb, leave_gb=args.leave_gb,
                  count_kv=args.count_kv, context=args.context, prompt=args.prompt,
                  plot_range=2.0 if args.plot else None)
    if args.plot:
        plot_frontier(result, args.plot)
    if args.json:
        print_json(result.to_dict(top=args.top))
    else:
        print(format_table(result, top=args.top))
        if args.plot:
            print(f"frontier plot -> {args.plot}")
    return 0
