"""``mobilemoe decide {tier,features,remoe-vs-hardware,profile}``: the on-device brief's product decisions.

Each prints a short table and a ``verdict:`` line (``--json``: the same numbers), and says where every
speed comes from: ``measured``, ``projected`` (the device profile's roofline) or ``calibrated``
(roofline x measured/roofline). The logic lives in :mod:`mobilemoe.scaling.decide`.
"""

from __future__ import annotations

import argparse

from mobilemoe.commands.common import number_arg as _float


def _device_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--device", required=required, metavar="NAME",
                   help="device profile name (`mobilemoe plan --list-devices`) or a profile YAML path "
                        "(e.g. from `mobilemoe decide profile`)")
    p.add_argument("--profiles-dir", metavar="DIR", action="append", help="extra directory of device profiles")
    p.add_argument("--json", action="store_true", help="print JSON")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "decide", help="product decisions: size tier, on-device vs cloud features, ReMoE vs new hardware",
        description="Answer the on-device brief's three product decisions from measured or projected numbers.")
    sub = p.add_subparsers(dest="decide_command", metavar="DECISION", required=True)

    t = sub.add_parser("tier", help="the most capable released tier that leaves --leave-gb of RAM free")
    _device_args(t)
    t.add_argument("--leave-gb", type=_float, required=True, metavar="GB",
                   help="RAM (GiB) to leave for everything else running on the device")
    t.add_argument("--context", type=int, default=2048, help="context for the KV cache and decode speed (2048)")
    t.add_argument("--prompt", type=int, default=256, help="prompt tokens for the TTFT column (256)")
    t.add_argument("--measured", metavar="FILE", help="`mobilemoe bench --json` output measured on this device")
    t.set_defaults(func=run_tier)

    f = sub.add_parser("features", help="which features run on-device and which in the cloud")
    _device_args(f)
    f.add_argument("--tier", required=True, help="mobilemoe-s | mobilemoe-m | mobilemoe-l")
    f.add_argument("--features", required=True, metavar="FILE.yaml",
                   help="features: name, prompt_tokens, reply_tokens, [context_tokens], max_ttft_s and/or "
                        "max_reply_s (see examples/brief_features.yaml)")
    f.add_argument("--leave-gb", type=_float, default=4.0, metavar="GB", help="RAM left for everything else (4)")
    f.add_argument("--measured", metavar="FILE", help="`mobilemoe bench --json` output measured on this device")
    f.set_defaults(func=run_features)

    r = sub.add_parser("remoe-vs-hardware", help="decode under expert offloading: ReMoE routers vs an upgraded device")
    r.add_argument("--model", required=True, help="MobileMoE checkpoint directory (the one ReMoE was trained on)")
    r.add_argument("--routers", required=True, help="router delta from `mobilemoe remoe train`")
    _device_args(r)
    r.add_argument("--upgrade", metavar="NAME", help="the device you would buy instead (profile name or YAML)")
    r.add_argument("--upgrade-cost", type=_float, metavar="X", help="its cost (any unit)")
    r.add_argument("--remoe-cost", type=_float, default=0.0, metavar="X",
                   help="the fine-tuning's cost in the same unit (default 0: no hardware)")
    cap = r.add_mutually_exclusive_group()
    cap.add_argument("--memory-budget", metavar="SIZE",
                     help="RAM for the model (e.g. 12MB, 1.5GiB): non-expert weights + KV cache + expert cache")
    cap.add_argument("--capacity", type=int, help="experts cached per MoE layer (instead of --memory-budget)")
    r.add_argument("--data", default=None,
                   help="workload text (any `remoe` --data form; default: ShareGPT prompts in the shared data)")
    r.add_argument("--windows", type=int, default=8, help="workload sequences to trace (8)")
    r.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (256); also the decode context")
    r.add_argument("--storage-latency-us", type=_float, default=None,
                   help="storage random-read latency (default 100 us; profiles have no latency field)")
    r.add_argument("--measure", action="store_true",
                   help="also measure offloaded decode TPOT on this machine in the native runtime")
    r.add_argument("--tpot-tokens", type=int, default=32, help="tokens decoded per prompt for --measure (32)")
    r.add_argument("--seed", type=int, default=0)
    r.set_defaults(func=run_remoe)

    m = sub.add_parser("profile", help="measure this machine's device profile (DRAM, INT4 GEMV/GEMM, disk)")
    m.add_argument("--out", required=True, help="profile YAML to write (use it as --device FILE)")
    m.add_argument("--name", default="this-machine", help="profile name (this-machine)")
    m.add_argument("--threads", type=int, default=None, help="torch threads to measure with (default: torch's)")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=run_profile)


def _device(args, name: str | None = None):
    from mobilemoe.scaling.profiles import get_profile

    return get_profile(name or args.device, args.profiles_dir)


def _measured(args):
    from mobilemoe.scaling.decide import load_measured

    return load_measured(args.measured) if args.measured else None


def run_tier(args) -> int:
    from mobilemoe.commands.common import print_json
    from mobilemoe.scaling.decide import tier_decision

    res = tier_decision(_device(args), args.leave_gb, args.context, args.prompt, _measured(args))
    if args.json:
        print_json(res)
        return 0
    print(f"{res['device']}: {res['memory_gb']:g} GiB RAM - {res['leave_gb']:g} GiB reserve = "
          f"{res['budget_gib']:.2f} GiB for INT4 weights + KV cache at {res['context']} tokens")
    print(f"  {'tier':<12} {'resident':>9} {'fits':>5}  {'TTFT@' + str(res['prompt']):>10}  {'decode':>9}  source")
    for r in res["tiers"]:
        mark = "yes" if r["fits"] else "no"
        print(f"  {r['tier']:<12} {r['memory_gib']:>5.2f} GiB {mark:>5}  {r['ttft_s']:>8.2f} s  "
              f"{r['decode_tok_s']:>5.1f} t/s  {r['decode_source']}" + ("  <- recommended" if r["recommended"] else ""))
    print(f"  speeds: {res['speeds_from']}")
    print(f"verdict: {res['verdict']}")
    return 0


def run_features(args) -> int:
    from mobilemoe.commands.common import print_json
    from mobilemoe.scaling.decide import feature_decisions, load_features

    res = feature_decisions(_device(args), args.tier, load_features(args.features), args.leave_gb, _measured(args))
    if args.json:
        print_json(res)
        return 0
    print(f"{res['tier']} on {res['device']} (budget {res['budget_gib']:.2f} GiB, window {res['max_context']} tokens)")
    print(f"  {'feature':<32} {'tokens in/out/ctx':>18} {'TTFT':>7} {'reply':>7} {'budget':>14}  verdict")
    for r in res["features"]:
        budget = " ".join(x for x in (f"ttft<={r['max_ttft_s']:g}s" if r["max_ttft_s"] else "",
                                      f"reply<={r['max_reply_s']:g}s" if r["max_reply_s"] else "") if x)
        io = f"{r['prompt_tokens']}/{r['reply_tokens']}/{r['context_tokens']}"
        why = f" ({'; '.join(r['why'])})" if r["why"] else ""
        print(f"  {r['feature'][:32]:<32} {io:>18} {r['ttft_s']:>6.2f}s {r['reply_s']:>6.2f}s {budget:>14}  "
              f"{r['verdict']}{why}")
    print(f"  speeds: {res['speeds_from']}")
    print(f"verdict: {res['verdict']}")
    return 0


def _default_data() -> str:
    from mobilemoe.errors import MobileMoEError
    from mobilemoe.eval.tasks import default_data_dir

    path = default_data_dir() / "sharegpt" / "ShareGPT_V3_filtered_1000.json"
    if not path.is_file():
        raise MobileMoEError(f"no ShareGPT prompts at {path}; give the workload with --data FILE")
    return str(path)


def _capacity(args, cfg) -> int:
    from mobilemoe.commands.generate import parse_size
    from mobilemoe.errors import MobileMoEError
    from mobilemoe.runtime.offload import plan_capacity

    if args.capacity is not None:
        if not cfg.num_experts_per_tok <= args.capacity <= cfg.num_local_experts:
            raise MobileMoEError(f"--capacity must be between top-k {cfg.num_experts_per_tok} and the "
                                 f"{cfg.num_local_experts} experts, got {args.capacity}")
        return args.capacity
    if args.memory_budget is None:
        return cfg.num_experts_per_tok
    try:
        budget = parse_size(args.memory_budget)
    except MobileMoEError as exc:
        raise MobileMoEError(str(exc).replace("--max-memory", "--memory-budget")) from None
    try:
        return plan_capacity(cfg, budget, args.seq_len)
    except MobileMoEError as exc:
        raise MobileMoEError(str(exc).replace("--max-memory", "--memory-budget").replace(
            "--max-seq-len", "--seq-len")) from None


def _inputs(args):
    """Adapters before/after ReMoE, their traces of the workload, C, and (``--measure``) measured TPOT."""
    import tempfile

    from mobilemoe.errors import MobileMoEError
    from mobilemoe.remoe.adapters import MobileMoEAdapter, load_adapter
    from mobilemoe.remoe.data import eval_windows, token_array
    from mobilemoe.remoe.traces import trace_sequences
    from mobilemoe.remoe.train import load_delta
    from mobilemoe.scaling.decide import RemoeInputs

    for name in ("windows", "seq_len", "tpot_tokens"):
        if getattr(args, name) < 1:
            raise MobileMoEError(f"--{name.replace('_', '-')} must be a positive integer")
    base = load_adapter(args.model)
    if not isinstance(base, MobileMoEAdapter):
        raise MobileMoEError(f"--model {args.model}: remoe-vs-hardware needs a MobileMoE checkpoint (its byte "
                             "counts and the offloading runtime); use `mobilemoe remoe eval` for other families")
    cfg = base.model.config
    after = load_adapter(args.model)
    after.load_router_state(load_delta(args.routers)[0])
    capacity = _capacity(args, cfg)
    tokens = token_array(args.data or _default_data(), args.model, "validation", args.seq_len * args.windows + 1,
                         cfg.vocab_size, args.seed, None)
    windows = eval_windows(tokens, args.seq_len, args.windows)
    seqs = [w[:, :-1] for w in windows]
    inp = RemoeInputs(cfg, trace_sequences(base, seqs, "workload"), trace_sequences(after, seqs, "workload"),
                      capacity, args.seq_len)
    if args.measure:
        from mobilemoe.remoe.evaluate import measured_tpot

        prompts = [s[:, :min(64, args.seq_len)] for s in seqs[:4]]
        with tempfile.TemporaryDirectory(prefix="mobilemoe-decide-") as tmp:
            inp.measured = measured_tpot({"before": base, "after": after}, prompts, args.tpot_tokens, capacity, tmp)
    return inp


def run_remoe(args) -> int:
    from mobilemoe.commands.common import print_json
    from mobilemoe.scaling.decide import remoe_vs_hardware

    device = _device(args)
    upgrade = _device(args, args.upgrade) if args.upgrade else None
    res = remoe_vs_hardware(_inputs(args), device, upgrade, args.upgrade_cost, args.remoe_cost,
                            args.storage_latency_us)
    if args.json:
        print_json(res)
        return 0
    print(f"experts offloaded: C={res['capacity']} of E={res['experts']} cached per MoE layer (top-k "
          f"{res['top_k']}), {res['expert_bytes']:,} B per expert, trace of {res['trace_tokens']} workload tokens")
    print(f"  {'case':<24} {'device':<18} {'misses/tok':>10} {'TPOT ms':>9} {'tok/s':>8}  source")
    for name, r in res["rows"].items():
        print(f"  {name:<24} {r['device'][:18]:<18} {r['misses_per_token']:>10.2f} {r['tpot_ms']:>9.3f} "
              f"{r['decode_tok_s']:>8.1f}  {r['source']}"
              + (f" (projected {r['projected_tpot_ms']:.3f} ms" if "projected_tpot_ms" in r else "")
              + (f"; {r['measured_misses_per_token']:.2f} misses/tok measured" if "measured_misses_per_token" in r else "")
              + (")" if "projected_tpot_ms" in r else ""))
    print(f"verdict: {res['verdict']}")
    return 0


def run_profile(args) -> int:
    import torch

    from mobilemoe.commands.common import print_json
    from mobilemoe.scaling.decide import measure_profile, write_profile

    if args.threads is not None:
        if args.threads < 1:
            from mobilemoe.errors import MobileMoEError

            raise MobileMoEError("--threads must be a positive integer")
        torch.set_num_threads(args.threads)
    res = measure_profile(args.name)
    path = write_profile(res["profile"], args.out)
    if args.json:
        print_json({"out": str(path), **res})
        return 0
    p = res["profile"]
    print(f"profile {p['name']} -> {path}")
    print(f"  {p['source']}")
    print(f"  use: mobilemoe decide tier --device {path} --leave-gb 4")
    return 0
