"""``mobilemoe remoe {train,eval,apply,trace}``: router-only ReMoE fine-tuning for expert reuse."""

from __future__ import annotations

import argparse


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="stdlib",
                   help="stdlib[:N] (embedded corpus); a text file (.txt/.md/.py..., split by blank-line "
                        "paragraphs), .jsonl/.parquet (field text) or ShareGPT .json; a folder (its *.txt *.text "
                        "*.md *.rst *.py files, or --glob) or DIR/**/*.EXT; or random[:V]. Every 20th "
                        "paragraph/row/file is held out for validation; under 20, the last 5%% of each "
                        "(default: stdlib)")
    p.add_argument("--glob", default=None, metavar="PATTERN",
                   help="with a folder --data: the files to read, e.g. '**/*.c' (default: the text suffixes above)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (train default 2048, eval 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (1 is fastest for tiny models)")


def _device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where the model runs (default auto: CUDA when present; cuda without a GPU is refused)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="frozen weights and autocast dtype; routers stay fp32 (default float32)")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "remoe", help="ReMoE: fine-tune only the routers for expert reuse; evaluate caching before/after",
        description="ReMoE (arXiv 2605.27081): train only the MoE routers with L_CE + l_kl*L_trust + "
                    "a_t*L_loc (reuse, smooth, lag, working set), evaluate expert overlap (EOR), cache hit "
                    "rates, perplexity and projected TPOT, and apply router deltas.")
    sub = p.add_subparsers(dest="remoe_command", metavar="ACTION", required=True)

    t = sub.add_parser("train", help="router-only fine-tuning; writes OUT/routers.safetensors (the delta)")
    t.add_argument("--model", required=True, help="model directory (MobileMoE checkpoint or local transformers MoE)")
    t.add_argument("--out", required=True, help="output directory")
    _data_args(t)
    t.add_argument("--steps", type=int, default=2000)
    t.add_argument("--lr", type=float, default=5e-5)
    t.add_argument("--warmup", type=int, default=200, help="LR warmup steps")
    t.add_argument("--schedule", default="constant", choices=("constant", "cosine", "linear", "wsd"))
    t.add_argument("--grad-accum", type=int, default=8)
    t.add_argument("--batch-size", type=int, default=1)
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--grad-clip", type=float, default=1.0)
    t.add_argument("--l-reuse", type=float, default=1.0)
    t.add_argument("--l-smooth", type=float, default=0.1)
    t.add_argument("--l-lag", type=float, default=0.05)
    t.add_argument("--l-ws", type=float, default=0.05)
    t.add_argument("--l-kl", type=float, default=1.0, help="Trust-KL weight")
    t.add_argument("--l-ce", type=float, default=1.0)
    t.add_argument("--t-warm", type=int, default=200, help="a_t = min(1, step / T_warm)")
    t.add_argument("--lags", default="1,2,4,8,16", help="comma-separated lags d of L_lag")
    t.add_argument("--window", type=int, default=8, help="working-set window W")
    t.add_argument("--max-tokens", type=int, default=2_000_000, help="training tokens to read from --data")
    _device_args(t)
    t.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each decoder layer's activations in backward (less memory, ~1/3 more compute)")
    t.add_argument("--checkpoint-every", type=int, default=0)
    t.add_argument("--resume", action="store_true", help="continue from the newest OUT/checkpoints/step-N")
    t.add_argument("--save-model", action="store_true", help="also write the full model to OUT/model")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=run_train)

    e = sub.add_parser("eval", help="EOR, cache hit rates, perplexity, projected TPOT (before vs after)")
    e.add_argument("--model", required=True)
    e.add_argument("--compare", default=None, help="a second model directory (e.g. after ReMoE)")
    e.add_argument("--routers", default=None, help="or: a router delta to compare against --model")
    _data_args(e)
    e.add_argument("--windows", type=int, default=16, help="validation sequences")
    _device_args(e)
    e.add_argument("--capacity", type=int, default=None, help="experts cached per layer (default: top-K)")
    e.add_argument("--compute-ms", type=float, default=0.0, help="compute time per token added to the TPOT")
    e.add_argument("--measure-disk", action="store_true", help="add this machine's disk (measured) to the profiles")
    e.add_argument("--measure-tpot", action="store_true",
                   help="also measure real decode TPOT in the native INT4 runtime with experts offloaded to an "
                        "expert store (C = --capacity cached per layer; MobileMoE models)")
    e.add_argument("--tpot-tokens", type=int, default=64, help="tokens decoded per prompt for --measure-tpot (64)")
    e.add_argument("--tpot-prompts", type=int, default=4, help="validation prompts for --measure-tpot (4)")
    e.add_argument("--tpot-dir", default=None, help="where --measure-tpot writes INT4 copies and expert stores "
                                                    "(default: a temporary directory)")
    e.add_argument("--heatmap", default=None, help="write an expert-use heatmap (before vs after) to this PNG")
    e.add_argument("--trace-out", default=None, help="save the routing trace(s) here (.npz; _after for --compare)")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=run_eval)

    a = sub.add_parser("apply", help="write a model (or a GGUF) with its routers replaced by a delta",
                       description="Checkpoint: `--model DIR --routers DELTA --out DIR`. GGUF (llama.cpp): "
                                   "`--gguf IN.gguf --routers DELTA OUT.gguf` patches only the router tensors.")
    src = a.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="mobilemoe or Hugging Face model directory")
    src.add_argument("--gguf", help="a GGUF exported by `mobilemoe export gguf` (patched in a copy)")
    a.add_argument("--routers", required=True, help="router delta .safetensors (from remoe train)")
    a.add_argument("out_gguf", nargs="?", help="with --gguf: the output GGUF path")
    a.add_argument("--out", help="with --model: the output directory")
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=run_apply)

    r = sub.add_parser("trace", help="record per-layer expert ids for a workload to a .npz")
    r.add_argument("--model", required=True)
    r.add_argument("--out", required=True, help="trace file (.npz)")
    _data_args(r)
    r.add_argument("--windows", type=int, default=8)
    r.add_argument("--generate", type=int, default=0, help="greedy-generate N tokens after each window (decode trace)")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=run_trace)


def _threads(args) -> None:
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


def _weights(args):
    from mobilemoe.errors import MobileMoEError
    from mobilemoe.remoe.losses import LossWeights

    try:
        lags = tuple(int(x) for x in args.lags.split(",") if x.strip())
    except ValueError:
        raise MobileMoEError(f"--lags must be comma-separated integers, got {args.lags!r}") from None
    return LossWeights(l_reuse=args.l_reuse, l_smooth=args.l_smooth, l_lag=args.l_lag, l_ws=args.l_ws,
                       l_kl=args.l_kl, l_ce=args.l_ce, warm_steps=args.t_warm, lags=lags, window=args.window)


def run_train(args) -> int:
    _threads(args)
    from dataclasses import asdict

    from mobilemoe.commands.common import print_json
    from mobilemoe.remoe.adapters import load_adapter
    from mobilemoe.remoe.data import batches, token_array
    from mobilemoe.remoe.train import DTYPES, RemoeTrainConfig, RemoeTrainer
    from mobilemoe.train.gpu import resolve_device

    resolve_device(args.device)  # a missing GPU is refused before any model is loaded
    adapter = load_adapter(args.model, dtype=DTYPES[args.dtype])  # the trainer then places it on --device
    seq = args.seq_len or 2048
    cfg = RemoeTrainConfig(steps=args.steps, lr=args.lr, warmup_steps=args.warmup, schedule=args.schedule,
                           grad_accum=args.grad_accum, batch_size=args.batch_size, seq_len=seq,
                           weight_decay=args.weight_decay, grad_clip=args.grad_clip, seed=args.seed,
                           checkpoint_every=args.checkpoint_every, weights=_weights(args), device=args.device,
                           dtype=args.dtype, gradient_checkpointing=args.gradient_checkpointing)
    cfg.validate()
    vocab = adapter.model.config.vocab_size
    tokens = token_array(args.data, args.model, "train", args.max_tokens, vocab, args.seed, args.glob)
    trainer = RemoeTrainer(adapter, cfg, batches(tokens, seq, args.batch_size, args.seed), args.out,
                           progress=not args.no_progress and not args.json)
    res = trainer.fit(resume=args.resume)
    model_dir = str(adapter.save(f"{args.out}/model")) if args.save_model else None
    rep = {k: v for k, v in asdict(res).items() if k != "history"}
    rep["model_dir"] = model_dir
    if args.json:
        print_json(rep)
        return 0
    f, l = res.loss_first, res.loss_last
    print(f"remoe train: {res.steps} steps in {res.seconds:.1f}s; ce {f.get('ce', 0):.4f} -> {l.get('ce', 0):.4f}, "
          f"rho {f.get('rho', 0):.4f} -> {l.get('rho', 0):.4f}, trust-KL {l.get('trust', 0):.5f}")
    print(f"  routers changed: {res.routers_changed}; {res.frozen_tensors_checked} other tensors bit-identical: "
          f"{res.frozen_identical}")
    print(f"  router delta -> {res.delta_path}" + (f"; model -> {model_dir}" if model_dir else ""))
    return 0


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def run_eval(args) -> int:
    _threads(args)
    from mobilemoe.commands.common import print_json
    from mobilemoe.errors import MobileMoEError
    from mobilemoe.remoe.adapters import load_adapter
    from mobilemoe.remoe.cache_sim import plot_heatmap
    from mobilemoe.remoe.data import eval_windows, token_array
    from mobilemoe.remoe.device import PROFILES, measure_local_disk
    from mobilemoe.remoe.evaluate import compare, evaluate, strip
    from mobilemoe.remoe.train import load_delta

    if args.compare and args.routers:
        raise MobileMoEError("give --compare or --routers, not both")
    seq = args.seq_len or 256
    profiles = dict(PROFILES)
    if args.measure_disk:
        prof = measure_local_disk()
        profiles[prof.name] = prof
    from mobilemoe.remoe.train import DTYPES
    from mobilemoe.train.gpu import resolve_device

    device, dtype = resolve_device(args.device), DTYPES[args.dtype]
    if args.measure_tpot and device.type != "cpu":
        raise MobileMoEError("--measure-tpot measures the native CPU INT4 runtime: use --device cpu")
    base = load_adapter(args.model, dtype=dtype)  # a bf16 run never holds an fp32 copy of the weights
    base.place(device, dtype)
    vocab = base.model.config.vocab_size
    tokens = token_array(args.data, args.model, "validation", seq * args.windows + 1, vocab, args.seed, args.glob)
    windows = [w.to(device) for w in eval_windows(tokens, seq, args.windows)]
    results = {"before": evaluate(base, windows, args.capacity, profiles=profiles, compute_ms=args.compute_ms)}
    other = None
    if args.compare:
        other = load_adapter(args.compare, dtype=dtype)
    elif args.routers:
        other = load_adapter(args.model, dtype=dtype)
        other.load_router_state(load_delta(args.routers)[0])
    if other is not None:
        other.place(device, dtype)
        results["after"] = evaluate(other, windows, args.capacity, profiles=profiles, compute_ms=args.compute_ms)
    if args.measure_tpot:
        import tempfile

        from mobilemoe.remoe.evaluate import measured_tpot

        models = {"before": base, **({"after": other} if other is not None else {})}
        prompts = [w[:, :min(64, seq)] for w in windows[:args.tpot_prompts]]
        with tempfile.TemporaryDirectory(prefix="mobilemoe-tpot-") as tmp:
            tpot = measured_tpot(models, prompts, args.tpot_tokens, results["before"]["capacity"],
                                 args.tpot_dir or tmp)
        for name, r in tpot.items():
            results[name]["measured_tpot"] = r
    if args.trace_out:
        results["before"]["trace"].save(args.trace_out)
        if other is not None:
            results["after"]["trace"].save(args.trace_out.replace(".npz", "") + "_after.npz")
    if args.heatmap:
        plot_heatmap(results["before"]["trace"].ids, results["after"]["trace"].ids if other else None,
                     base.num_experts, args.heatmap)
    out = {k: strip(v) for k, v in results.items()}
    if other is not None:
        out["change"] = compare(results["before"], results["after"])
    if args.json:
        print_json(out)
        return 0
    cols = list(out)
    cols = [c for c in cols if c != "change"]
    rows = [("perplexity", "perplexity"), ("EOR", "eor"), ("bound K(1-EOR) misses/token (all layers)", "bound_misses_per_token")]
    print(f"capacity C={out['before']['capacity']} per layer, K={out['before']['top_k']}, "
          f"expert {out['before']['expert_bytes']:,} B (INT4), {out['before']['tokens']} tokens")
    print(f"{'metric':44s}" + "".join(f"{c:>12s}" for c in cols))
    for label, key in rows:
        print(f"{label:44s}" + "".join(f"{_fmt(out[c][key]):>12s}" for c in cols))
    for pol in out["before"]["hit_rate"]:
        print(f"{pol + ' hit rate':44s}" + "".join(f"{_fmt(out[c]['hit_rate'][pol]):>12s}" for c in cols))
    for pol in out["before"]["misses_per_token"]:
        print(f"{pol + ' misses/token':44s}" + "".join(f"{_fmt(out[c]['misses_per_token'][pol]):>12s}" for c in cols))
    for name in out["before"]["tpot_ms"]:
        print(f"{'projected TPOT ms ' + name:44s}" + "".join(f"{_fmt(out[c]['tpot_ms'][name]):>12s}" for c in cols))
    if "measured_tpot" in out["before"]:
        mt = {c: out[c]["measured_tpot"] for c in cols}
        print(f"{'measured TPOT ms, experts offloaded':44s}" + "".join(f"{mt[c]['offloaded']['tpot_ms']:>12.4f}" for c in cols))
        print(f"{'measured misses/token, experts offloaded':44s}"
              + "".join(f"{mt[c]['offloaded']['misses_per_token']:>12.4f}" for c in cols))
        print(f"{'measured TPOT ms, all experts in RAM':44s}" + "".join(f"{mt[c]['in_ram']['tpot_ms']:>12.4f}" for c in cols))
    if "change" in out:
        ch = out["change"]
        line = f"EOR {ch['eor_rel_change']:+.1%} relative; perplexity {ch['ppl_rel_change']:+.2%}"
        if "measured_tpot" in out["before"]:
            b, a = (out[c]["measured_tpot"]["offloaded"]["tpot_ms"] for c in ("before", "after"))
            line += f"; offloaded decode TPOT {a / b - 1:+.1%}"
        print(line)
    return 0


def run_apply(args) -> int:
    from mobilemoe.commands.common import print_json
    from mobilemoe.errors import MobileMoEError

    if args.gguf is not None:
        from mobilemoe.export.gguf import patch_routers

        if args.out_gguf is None:
            raise MobileMoEError("remoe apply --gguf IN.gguf --routers DELTA OUT.gguf: give the output GGUF path")
        patched = patch_routers(args.gguf, args.routers, args.out_gguf)
        out = args.out_gguf
    else:
        from mobilemoe.remoe.train import apply_delta

        if args.out is None or args.out_gguf is not None:
            raise MobileMoEError("remoe apply --model DIR --routers DELTA --out DIR (a positional output is for --gguf)")
        out, patched = apply_delta(args.model, args.routers, args.out), None
    if args.json:
        print_json({"out": str(out), "patched": patched})
    else:
        print(f"remoe apply: routers from {args.routers} -> {out}")
    return 0


def run_trace(args) -> int:
    _threads(args)
    import torch

    from mobilemoe.commands.common import print_json
    from mobilemoe.remoe.adapters import load_adapter
    from mobilemoe.remoe.data import eval_windows, token_array
    from mobilemoe.remoe.traces import trace_generation, trace_sequences

    adapter = load_adapter(args.model)
    seq = args.seq_len or 256
    tokens = token_array(args.data, args.model, "validation", seq * args.windows + 1,
                         adapter.model.config.vocab_size, args.seed, args.glob)
    seqs = [w[:, :-1] for w in eval_windows(tokens, seq, args.windows)]
    tr = trace_generation(adapter, seqs, args.generate) if args.generate else trace_sequences(adapter, seqs)
    path = tr.save(args.out)
    info = {"out": str(path), "tokens": tr.num_tokens, "shape": list(tr.ids.shape), **tr.meta}
    if args.json:
        print_json(info)
    else:
        print(f"remoe trace: {tr.num_tokens} tokens x {tr.ids.shape[0]} layers x K={tr.ids.shape[2]} -> {path}")
    return 0
