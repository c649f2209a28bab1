"""The ExecuTorch ``.pte`` of one INT4 checkpoint (routed INT4 experts) against the exact INT4 forward,
beside the native runtime.

Takes ``--ckpt`` (e.g. ``runs/demo/int4``) or builds a random-weight INT4 checkpoint of ``--preset`` in
the released layout; with ``--layers N`` both runtimes get the checkpoint truncated to its first N
layers (written to the workdir; the JSON says so). Exports it as ``mobilemoe export executorch`` does
(8da4w, MoE blocks as ``llama::quantized_moe_ffn``) and reports:

* ``export``: seconds, the process's peak RSS after the export (the first heavy step), ``.pte`` bytes;
* ``fidelity``: the ``.pte``'s logits and the native runtime's (``Engine.load(ckpt)``, one token per
  step) against ``load_model(ckpt)``'s exact float forward of the same INT4 weights, over
  ``--positions`` positions of random token ids in sequences of ``--seq-len``: max abs, mean
  KL(ref || got), top-1 agreement, and the ``.pte``'s top-1 minus the native one's on the same
  positions (paired standard error). The ``.pte`` runs the first half of each sequence through its
  ``prefill`` method (whole chunks) and the rest one token per ``forward`` call (``decode_max_abs``);
* ``poisoned``: the poisoned-expert check on this model: every routed expert that no token of a
  ``--poison-prompt``-token prompt chooses is NaN before export (chosen = the union of the exact
  model's routing and the eager 8da4w module's routing as the op computes it, plus experts whose
  selection score is within ``--tie-margin`` of a token's k-th best, so a rounding-level tie cannot
  pick a poisoned one); the poisoned ``.pte``'s prompt logits must be finite and bit-equal to the
  unpoisoned ``.pte``'s;
* ``expert_bytes``: routed-expert bytes a decoded token reads in the program = top_k x MoE layers x one
  expert's blob bytes (from the packed tensors), beside ``mobilemoe.accounting``'s INT4-checkpoint
  figure (top_k x MoE layers x ``routed_expert_bytes``) and the ratio (the blobs keep an fp32 scale and
  an int32 code sum per group of 32 where the checkpoint keeps one fp16 scale, plus a 64-byte header);
* ``speed``: prefill and decode tok/s of the ``.pte`` (ExecuTorch runtime, its threadpool reset to
  ``--threads``) and of the native runtime (``torch.set_num_threads(--threads)``), ``--prompt`` tokens
  then ``--gen`` greedy tokens through ``Engine.generate``, the two runtimes alternating within each of
  ``--reps`` repetitions (same random prompt), after one warm-up each: median, min and max; and the
  same in tokens per CPU second of this process (``*_per_cpu_s``; greedy, one thread each), which a
  busy shared core does not deflate. ``--speed-only`` re-times the ``model.pte`` left in ``--workdir``.

Prints one JSON object. Timings on a shared machine are noisy: read the spread.

Usage: python benchmarks/export_executorch.py [--ckpt DIR | --preset tiny-moe|mobilemoe-s|...]
           [--layers N] [--positions 256] [--seq-len 128] [--prompt 64] [--gen 32] [--reps 3]
           [--threads 1] [--poison-prompt 10] [--workdir DIR] [--out FILE.json] [--speed-only]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def ckpt_bytes(ckpt: Path) -> int:
    return sum(p.stat().st_size for p in Path(ckpt).glob("*.safetensors"))


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def truncate_checkpoint(ckpt: Path, layers: int, out: Path) -> Path:
    """``ckpt``'s first ``layers`` layers (embedding, final norm and head kept) as a checkpoint at ``out``."""
    from mobilemoe.checkpoint import expected_tensors, load_tensors, save_tensors

    cfg, tensors = load_tensors(ckpt, lazy=True)
    if layers >= cfg.num_hidden_layers:
        return Path(ckpt)
    small = cfg.replace(num_hidden_layers=layers, no_rope_layers=list(cfg.no_rope_layers[:layers]))
    if (out / "config.json").exists() and type(cfg).from_json(out / "config.json").to_dict() == small.to_dict():
        return out  # written by an earlier run
    save_tensors({name: tensors[name] for name in expected_tensors(small)}, small, out)
    for extra in ("tokenizer.json",):
        if (Path(ckpt) / extra).exists():
            (out / extra).write_bytes((Path(ckpt) / extra).read_bytes())
    return out


# ---------------------------------------------------------------------- poisoned experts
def _near_topk(sel, k: int, margin: float) -> set[int]:
    """Experts within ``margin`` of some row's k-th best selection score (the top k included)."""
    import torch

    kth = sel.topk(k, dim=-1).values[:, -1:]
    return set(torch.nonzero(sel >= kth - margin)[:, 1].tolist())


def chosen_experts(ckpt: Path, ids: list[int], max_seq_len: int, margin: float) -> tuple[list[set[int]], int]:
    """Per MoE layer, every expert some token of ``ids`` may choose: the exact model's routing, the eager
    8da4w op module's routing (its router inputs, selected by the op's rule), and near ties of either.
    Returns (sets, experts added only by the 8da4w routing or the margin)."""
    import torch

    from mobilemoe.checkpoint import load_model
    from mobilemoe.export.executorch import QuantizedMoE, checkpoint_linear_codes, quantize_8da4w, static_module
    from mobilemoe.train.balance import moe_blocks

    model = load_model(ckpt, dtype=torch.float32).eval()
    k = model.config.num_experts_per_tok
    with torch.no_grad():
        out = model(torch.tensor([ids]), return_router=True)
    exact = [set(r.expert_ids.flatten().tolist()) for r in out.router]
    union = [set(s) for s in exact]
    for i, (r, block) in enumerate(zip(out.router, moe_blocks(model))):  # near ties of the exact routing
        logits = r.logits.reshape(-1, r.logits.shape[-1]).float()
        scores = torch.sigmoid(logits) if model.config.router_type == "sigmoid" else torch.softmax(logits, -1)
        union[i] |= _near_topk(scores + block.expert_bias.float(), k, margin)
    module = static_module(model, max_seq_len, "op")
    quantize_8da4w(module, codes=checkpoint_linear_codes(ckpt))  # as export_executorch does
    inputs: list = []
    hooks = [m.register_forward_pre_hook(lambda m, a: inputs.append((m, a[0].detach())))
             for m in module.modules() if isinstance(m, QuantizedMoE)]
    with torch.no_grad():
        module(torch.tensor([ids]), torch.tensor([0]))
    for h in hooks:
        h.remove()
    for i, (m, x) in enumerate(inputs):
        logits = x.reshape(-1, x.shape[-1]).float() @ m.gate_weight.t()
        if m.score_func == "sigmoid":
            sel = torch.sigmoid(logits) + (m.expert_bias if m.expert_bias.numel() else 0)
        else:
            sel = logits
        union[i] |= _near_topk(sel, k, margin)
    added = sum(len(u - e) for u, e in zip(union, exact))
    return union, added


def poisoned_check(ckpt: Path, clean_pte: Path, work: Path, ids: list[int], max_seq_len: int,
                   prefill_chunk: int, margin: float) -> dict:
    """Export ``ckpt`` with every expert outside :func:`chosen_experts` NaN (as export_executorch
    builds the program: op experts, 8da4w), run ``ids`` through it and through ``clean_pte``."""
    import torch

    from mobilemoe.checkpoint import load_model
    from mobilemoe.export.executorch import (PteRunner, checkpoint_expert_codes, checkpoint_linear_codes,
                                             export_module, quantize_8da4w, static_module)
    from mobilemoe.train.balance import moe_blocks

    if checkpoint_expert_codes(ckpt):
        return {"skipped": "code-exact ('in'-axis) checkpoint: the export refuses experts that are not its codes"}
    chosen, added = chosen_experts(ckpt, ids, max_seq_len, margin)
    model = load_model(ckpt, dtype=torch.float32).eval()
    n_experts = model.config.num_local_experts
    poisoned_per_layer = []
    with torch.no_grad():
        for block, used in zip(moe_blocks(model), chosen):
            bad = [e for e in range(block.experts.gate_up_proj.shape[0]) if e not in used]
            for e in bad:
                block.experts.gate_up_proj[e] = float("nan")
                block.experts.down_proj[e] = float("nan")
            poisoned_per_layer.append(len(bad))
    module = static_module(model, max_seq_len, "op")
    quantize_8da4w(module, codes=checkpoint_linear_codes(ckpt))  # as export_executorch does
    path = export_module(module, work / "poisoned.pte", min(prefill_chunk, max_seq_len))
    del model, module
    gc.collect()
    clean = PteRunner(clean_pte)(ids, 0)
    got = PteRunner(path)(ids, 0)
    return {"prompt_tokens": len(ids), "poisoned_per_layer": poisoned_per_layer,
            "poisoned_total": sum(poisoned_per_layer), "experts_per_layer": n_experts,
            "added_by_8da4w_routing_or_margin": added, "tie_margin": margin,
            "finite": bool(torch.isfinite(got).all()), "bit_equal_to_unpoisoned": bool(torch.equal(got, clean)),
            "max_abs_vs_unpoisoned": float((got - clean).abs().max())}


# ---------------------------------------------------------------------- bytes, fidelity, speed
def expert_bytes(ckpt: Path, max_seq_len: int) -> dict:
    """Routed-expert bytes read per decoded token: the program's blobs vs the accounting's INT4 figure."""
    import torch

    from mobilemoe.accounting import routed_expert_bytes, runtime_expert_bytes
    from mobilemoe.checkpoint import load_model
    from mobilemoe.export.executorch import routed_expert_blob_bytes, static_module

    model = load_model(ckpt, dtype=torch.float32).eval()
    cfg = model.config
    module = static_module(model, max_seq_len, "op")
    blobs = routed_expert_blob_bytes(module)
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    assert len(blobs) == moe_layers and len(set(blobs)) == 1, blobs
    k = cfg.num_experts_per_tok
    pte = k * sum(blobs)
    acct = k * moe_layers * routed_expert_bytes(cfg, "int4")
    H, I = cfg.hidden_size, cfg.intermediate_size
    groups = (2 * I * H + H * I) // 32
    return {"top_k": k, "moe_layers": moe_layers, "expert_blob_bytes": blobs[0],
            "pte_bytes_per_token": pte, "accounting_int4_bytes_per_token": acct,
            "ratio_pte_over_accounting": round(pte / acct, 4),
            "native_runtime_bytes_per_token": k * moe_layers * runtime_expert_bytes(cfg),
            "bits_per_weight": {"pte_blob": round(8 * blobs[0] / (3 * H * I), 3),
                                "int4_checkpoint": round(8 * routed_expert_bytes(cfg, "int4") / (3 * H * I), 3)},
            "why": f"per group of 32 weights the blob keeps 16 B of codes + an fp32 scale + an int32 code sum "
                   f"(24 B) where the checkpoint keeps 16 B + an fp16 scale (18 B): 4/3, plus a 64-byte header "
                   f"per matrix ({groups} groups a expert)"}


def _split(positions: int, seq_len: int) -> list[int]:
    n = max(1, math.ceil(positions / seq_len))
    return [positions // n + (i < positions % n) for i in range(n)]


def pte_logits(pte: Path, s: list[int]) -> tuple[np.ndarray, int]:
    """The first half (whole prefill chunks) through ``prefill``, the rest one token per ``forward``."""
    import torch

    from mobilemoe.export.executorch import PteRunner

    runner = PteRunner(pte)
    n_pre = len(s) // 2 // runner.chunk * runner.chunk
    parts = [runner(s[:n_pre], 0)] if n_pre else []
    parts += [runner.step(t, n_pre + i)[None] for i, t in enumerate(s[n_pre:])]
    return torch.cat(parts).float().numpy(), n_pre


def fidelity_rows(ckpt: Path, pte: Path, seqs, max_seq_len: int) -> dict:
    from mobilemoe.eval.logit_agreement import fidelity, max_abs, paired_top1, reference_logits, stepwise_logits
    from mobilemoe.runtime import Engine

    ref = reference_logits(ckpt, seqs)
    got = [pte_logits(pte, s) for s in seqs]
    pte_l = [g for g, _ in got]
    dec_err = max(float(np.abs(r[n:] - g[n:]).max()) for r, (g, n) in zip(ref, got) if n < len(r))
    engine = Engine.load(ckpt, max_seq_len=max_seq_len)
    nat_l = [stepwise_logits(engine, s) for s in seqs]
    native, native_agree = fidelity(ref, nat_l)
    native.update(max_abs=max_abs(ref, nat_l), backend=type(engine.backend).__name__)
    pte_row, pte_agree = fidelity(ref, pte_l)
    pte_row.update(max_abs=max_abs(ref, pte_l), decode_max_abs=dec_err,
                   prefill_positions=sum(n for _, n in got), **paired_top1(pte_agree, native_agree))
    return {"pte": pte_row, "native": native}


def _gen_once(engine, ids, gen) -> tuple[float, float]:
    res = engine.generate(ids, max_new_tokens=gen)
    return len(ids) / res.ttft_s, res.decode_tok_s


def _gen_cpu(engine, ids, gen) -> tuple[float, float]:
    """Greedy prefill + ``gen - 1`` decode steps like ``Engine.generate``, timed in this process's CPU
    seconds (one thread each): tok/s that a busy shared core does not deflate."""
    engine.reset()
    t0 = time.process_time()
    logits = engine.prefill(ids)
    t1 = time.process_time()
    for _ in range(gen - 1):
        logits = engine.decode(int(logits.argmax()))
    t2 = time.process_time()
    return len(ids) / max(t1 - t0, 1e-9), (gen - 1) / max(t2 - t1, 1e-9)


def speed(ckpt: Path, pte: Path, max_seq_len: int, prompt: int, gen: int, reps: int, threads: int) -> dict:
    import torch
    from executorch.extension.pybindings import portable_lib

    from mobilemoe.runtime import Engine

    torch.set_num_threads(threads)
    portable_lib._unsafe_reset_threadpool(threads)
    engines = {"pte": Engine.load(pte, max_seq_len=max_seq_len), "native": Engine.load(ckpt, max_seq_len=max_seq_len)}
    vocab = engines["native"].config.vocab_size
    gen_ids = torch.Generator().manual_seed(0)
    for e in engines.values():  # warm-up
        _gen_once(e, list(range(min(prompt, 8))), 2)
    keys = ("prefill", "decode", "prefill_cpu", "decode_cpu")
    runs: dict[str, dict[str, list[float]]] = {n: {k: [] for k in keys} for n in engines}
    for rep in range(reps):
        ids = torch.randint(0, vocab, (prompt,), generator=gen_ids).tolist()
        order = list(engines) if rep % 2 == 0 else list(engines)[::-1]  # alternate who goes first
        for name in order:
            p, d = _gen_once(engines[name], ids, gen)
            runs[name]["prefill"].append(p)
            runs[name]["decode"].append(d)
        for name in order:
            p, d = _gen_cpu(engines[name], ids, gen)
            runs[name]["prefill_cpu"].append(p)
            runs[name]["decode_cpu"].append(d)

    def summary(xs):
        return {"median": round(statistics.median(xs), 2), "min": round(min(xs), 2), "max": round(max(xs), 2),
                "all": [round(x, 2) for x in xs]}

    out = {n: {"prefill_tok_s": summary(r["prefill"]), "decode_tok_s": summary(r["decode"]),
               "prefill_tok_per_cpu_s": summary(r["prefill_cpu"]), "decode_tok_per_cpu_s": summary(r["decode_cpu"])}
           for n, r in runs.items()}
    out["native"]["backend"] = type(engines["native"].backend).__name__
    out["threads"] = {"executorch_threadpool": int(portable_lib._threadpool_get_thread_count()),
                      "torch": torch.get_num_threads()}
    out["decode_ratio_pte_over_native"] = round(out["pte"]["decode_tok_s"]["median"]
                                                / out["native"]["decode_tok_s"]["median"], 3)
    out["prefill_ratio_pte_over_native"] = round(out["pte"]["prefill_tok_s"]["median"]
                                                 / out["native"]["prefill_tok_s"]["median"], 3)
    out["decode_ratio_pte_over_native_cpu"] = round(out["pte"]["decode_tok_per_cpu_s"]["median"]
                                                    / out["native"]["decode_tok_per_cpu_s"]["median"], 3)
    return out


def measure(ckpt: Path, work: Path, *, layers: int | None = None, positions: int = 256, seq_len: int = 128,
            prompt: int = 64, gen: int = 32, reps: int = 3, threads: int = 1, poison_prompt: int = 10,
            prefill_chunk: int | None = None, tie_margin: float = 1e-3, speed_only: bool = False) -> dict:
    """The whole benchmark on one checkpoint (the core of ``main``; ``reps=0`` skips the timing;
    ``speed_only``: time the ``model.pte`` an earlier run left in ``work``, nothing else)."""
    import torch

    from mobilemoe.config import MobileMoEConfig
    from mobilemoe.export.executorch import PREFILL_CHUNK, export_executorch

    work.mkdir(parents=True, exist_ok=True)
    prefill_chunk = prefill_chunk or PREFILL_CHUNK
    full = MobileMoEConfig.from_json(Path(ckpt) / "config.json")
    if layers is not None and layers < full.num_hidden_layers:
        ckpt = truncate_checkpoint(Path(ckpt), layers, work / f"{Path(ckpt).name}-{layers}layers")
    cfg = MobileMoEConfig.from_json(Path(ckpt) / "config.json")
    max_seq_len = max(seq_len, prompt + gen, poison_prompt)
    result = {"ckpt": str(ckpt), "ckpt_bytes": ckpt_bytes(ckpt),
              "layers": {"used": cfg.num_hidden_layers, "of": full.num_hidden_layers,
                         "truncated": cfg.num_hidden_layers < full.num_hidden_layers},
              "config": {k: getattr(cfg, k) for k in ("hidden_size", "intermediate_size", "num_local_experts",
                                                      "num_experts_per_tok", "vocab_size", "num_shared_experts")},
              "max_seq_len": max_seq_len, "prefill_chunk": prefill_chunk}

    pte = work / "model.pte"
    if speed_only:
        result["speed"] = {"prompt": prompt, "gen": gen, "reps": reps,
                           **speed(ckpt, pte, max_seq_len, prompt, gen, reps, threads)}
        return result
    rss0 = peak_rss_mb()
    t0 = time.perf_counter()
    export_executorch(ckpt, pte, max_seq_len=max_seq_len, prefill_chunk=prefill_chunk)
    result["export"] = {"seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": peak_rss_mb(),
                        "peak_rss_mb_before": rss0, "pte_bytes": pte.stat().st_size}
    gc.collect()

    gen_ids = torch.Generator().manual_seed(1)
    poison_ids = torch.randint(0, cfg.vocab_size, (poison_prompt,), generator=gen_ids).tolist()
    t0 = time.perf_counter()
    result["poisoned"] = poisoned_check(ckpt, pte, work, poison_ids, max_seq_len, prefill_chunk, tie_margin)
    result["poisoned"]["seconds"] = round(time.perf_counter() - t0, 1)
    gc.collect()
    result["expert_bytes"] = expert_bytes(ckpt, max_seq_len)
    gc.collect()

    seqs = [torch.randint(0, cfg.vocab_size, (n,), generator=gen_ids).tolist() for n in _split(positions, seq_len)]
    result["fidelity"] = fidelity_rows(ckpt, pte, seqs, max_seq_len)
    gc.collect()
    if reps > 0:
        result["speed"] = {"prompt": prompt, "gen": gen, "reps": reps,
                           **speed(ckpt, pte, max_seq_len, prompt, gen, reps, threads)}
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny-moe", help="random INT4 checkpoint of this preset (without --ckpt)")
    ap.add_argument("--ckpt", default=None, help="an existing INT4 checkpoint (e.g. runs/demo/int4)")
    ap.add_argument("--layers", type=int, default=None, help="truncate both runtimes' model to its first N layers")
    ap.add_argument("--positions", type=int, default=256, help="fidelity positions (random token ids)")
    ap.add_argument("--seq-len", type=int, default=128, help="fidelity sequence length (also the .pte's cache)")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3, help="timing repetitions; 0 skips the timing")
    ap.add_argument("--threads", type=int, default=1, help="ExecuTorch threadpool and torch threads")
    ap.add_argument("--poison-prompt", type=int, default=10, help="prompt tokens of the poisoned-expert check")
    ap.add_argument("--tie-margin", type=float, default=1e-3)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--speed-only", action="store_true",
                    help="only time the model.pte an earlier run left in --workdir")
    args = ap.parse_args()

    from mobilemoe.bench.random_int4 import write_random_int4_checkpoint
    from mobilemoe.config import preset

    work = Path(args.workdir or tempfile.mkdtemp(prefix="export_executorch_"))
    ckpt = Path(args.ckpt) if args.ckpt else write_random_int4_checkpoint(preset(args.preset),
                                                                          work / f"{args.preset}-int4")
    result = {"model": args.ckpt or f"random INT4 {args.preset}",
              **measure(ckpt, work, layers=args.layers, positions=args.positions, seq_len=args.seq_len,
                        prompt=args.prompt, gen=args.gen, reps=args.reps, threads=args.threads,
                        poison_prompt=args.poison_prompt, tie_margin=args.tie_margin,
                        speed_only=args.speed_only)}
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
