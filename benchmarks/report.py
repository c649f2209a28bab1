"""Render benchmark JSON results as the markdown tables of BENCHMARKS.md.

    python benchmarks/report.py runtime runs/bench/moe_vs_dense.json
    python benchmarks/report.py training runs/train_tiny/result.json
    python benchmarks/report.py remoe runs/remoe_bench/remoe_eval.json
    python benchmarks/report.py scaling runs/sweep/result.json
"""

from __future__ import annotations

import json
import sys


def runtime(r: dict) -> str:
    ours, cpp, ceil = r["by_runtime"]["mobilemoe"], r["by_runtime"].get("llama_cpp"), r["by_runtime"]["ceilings"]
    m = r["machine"]
    lines = [f"{r['bench_config']['moe']} vs {r['bench_config']['dense']}, {m['threads']} threads, {m['cpu']}, "
             f"torch {m['torch']}, {m['date']}; DRAM read {r['dram_read_gbs']:.1f} GB/s (measured in the run); "
             f"medians of {r['bench_config']['repeats']} repeats, {r['bench_config']['decode_tokens']} decode steps.",
             "",
             "| context | runtime | MoE prefill tok/s | dense prefill tok/s | prefill MoE/dense (ceiling) "
             "| MoE decode tok/s | dense decode tok/s | decode MoE/dense (ceiling) | MoE TTFT s | dense TTFT s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for ctx in r["bench_config"]["contexts"]:
        c = ceil[str(ctx)]
        for name, d in (("mobilemoe", ours), ("llama.cpp", cpp)):
            if d is None:
                continue
            lines.append(
                f"| {ctx} | {name} | {d[f'moe_prefill_tok_s_{ctx}']:.0f} | {d[f'dense_prefill_tok_s_{ctx}']:.0f} "
                f"| {d[f'prefill_speedup_{ctx}']:.2f} ({c['prefill_ceiling']:.2f}) "
                f"| {d[f'moe_decode_tok_s_{ctx}']:.1f} | {d[f'dense_decode_tok_s_{ctx}']:.1f} "
                f"| {d[f'decode_speedup_{ctx}']:.2f} ({c['decode_ceiling']:.2f}) "
                f"| {d[f'moe_ttft_s_{ctx}']:.3f} | {d[f'dense_ttft_s_{ctx}']:.3f} |")
    lines += ["", "| context | MoE decode: mobilemoe / llama.cpp | dense decode: mobilemoe / llama.cpp "
              "| MoE prefill: mobilemoe / llama.cpp | dense prefill: mobilemoe / llama.cpp "
              "| MoE roofline tok/s | dense roofline tok/s |", "|---|---|---|---|---|---|---|"]
    for ctx in r["bench_config"]["contexts"]:
        c = ceil[str(ctx)]
        if cpp is None:
            break
        lines.append(
            f"| {ctx} | {ours[f'moe_decode_tok_s_{ctx}'] / cpp[f'moe_decode_tok_s_{ctx}']:.2f} "
            f"| {ours[f'dense_decode_tok_s_{ctx}'] / cpp[f'dense_decode_tok_s_{ctx}']:.2f} "
            f"| {ours[f'moe_prefill_tok_s_{ctx}'] / cpp[f'moe_prefill_tok_s_{ctx}']:.2f} "
            f"| {ours[f'dense_prefill_tok_s_{ctx}'] / cpp[f'dense_prefill_tok_s_{ctx}']:.2f} "
            f"| {c['moe_roofline_decode_tok_s']:.0f} | {c['dense_roofline_decode_tok_s']:.0f} |")
    lines += ["", "| peak RSS (MiB) at the largest context | MoE | dense |", "|---|---|---|"]
    for name, d in (("mobilemoe", ours), ("llama.cpp", cpp)):
        if d is not None:
            lines.append(f"| {name} | {d['moe_peak_rss_bytes'] / 2**20:.0f} | {d['dense_peak_rss_bytes'] / 2**20:.0f} |")
    return "\n".join(lines)


def training(r: dict) -> str:
    lines = ["| model | active params | tokens | wall s | tok/s | final val loss |", "|---|---|---|---|---|---|"]
    for label in ("moe", "dense"):
        d = r[label]
        lines.append(f"| {d['preset']} | {d['active_params'] / 1e3:.0f}K | {d['tokens']} | {d['wall_seconds']:.0f} "
                     f"| {d['tokens_per_s']:.0f} | {d['final_val_loss']:.3f} |")
    lines.append(f"| unigram baseline (train counts, add-one) | | | | | {r['unigram_val_loss']:.3f} |")
    q = r["int4"]
    lines += ["", f"| {q['steps']} more steps from the pre-trained MoE | validation loss | gap to float |",
              "|---|---|---|",
              f"| float (continued, no QAT) | {q['float_val_loss']:.4f} | |",
              f"| PTQ INT4 of that float model | {q['ptq_int4_val_loss']:.4f} | {q['ptq_gap']:+.4f} |",
              f"| QAT, converted to INT4 | {q['qat_int4_val_loss']:.4f} | {q['qat_gap']:+.4f} |"]
    if q.get("gap_recovered") is not None:
        lines.append(f"\nQAT recovers {100 * q['gap_recovered']:.0f}% of the PTQ gap.")
    s = r["sft"]
    lines += ["", f"SFT on GSM8K train: {s['steps']} steps, {s['tokens']} tokens, final val loss {s['final_val_loss']:.3f}. "
              f"Greedy answer to the first GSM8K test question (stopped by {s['stopped_by']}, "
              f"'####' present: {s['has_final_answer_marker']}):", "", "```", s["answer"][:600], "```"]
    return "\n".join(lines)


REMOE_LABELS = {"remoe": "ReMoE", "ce_only": "CE-only control (l_loc = l_kl = 0)", "no_trust": "no Trust-KL (l_kl = 0)",
                "no_reuse": "no reuse term (l_reuse = 0)"}


def remoe(r: dict) -> str:
    b = r["before"]
    mt = b.get("measured_tpot")
    head = ("| run | perplexity | perplexity change | EOR | EOR change | LRU hit (C=K) | LRU hit (C=2K) | decode EOR"
            + (f" | offloaded TPOT ms (C={mt['capacity']}) | TPOT change | misses/token | in-RAM TPOT ms |" if mt else " |"))
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def row(name: str, a: dict, run: dict | None) -> str:
        cells = [name, f"{a['perplexity']:.2f}", f"{run['ppl_rel_change']:+.2%}" if run else "",
                 f"{a['eor']:.4f}", f"{run['eor_rel_change']:+.1%}" if run else "", f"{a['hit_rate']['lru']:.3f}",
                 f"{a['hit_rate_2K']['lru']:.3f}", f"{a.get('decode_eor', float('nan')):.3f}"]
        if mt:
            m = a["measured_tpot"]
            cells += [f"{m['offloaded']['tpot_ms']:.3f}", f"{run['offloaded_tpot_rel_change']:+.1%}" if run else "",
                      f"{m['offloaded']['misses_per_token']:.2f}", f"{m['in_ram']['tpot_ms']:.3f}"]
        return "| " + " | ".join(cells) + " |"

    lines.append(row("before", b, None))
    for name, run in r["runs"].items():
        lines.append(row(REMOE_LABELS.get(name, name), run["after"], run))
    return "\n".join(lines)


def scaling(r: dict) -> str:
    lines = ["| model | family | tokens | active params | INT4 MB | val loss |", "|---|---|---|---|---|---|"]
    for t in r["table"]:
        lines.append(f"| {t['label']} | {t['family']} | {t['tokens']:.2g} | {t['n_act'] / 1e6:.2f}M | "
                     f"{t['int4_bytes'] / 1e6:.2f} | {t['loss']:.4f} |")
    lines += ["", "| fit | runs | form | in-sample RMSE (log loss) | held-out MAPE |", "|---|---|---|---|---|"]
    for f in r["fits"]:
        ho = f.get("heldout") or {}
        lines.append(f"| {f['family']} | {f['n_runs']} | {'joint' if f['joint'] else 'single-E'} | {f['rmse_log']:.4f} | "
                     + (f"{ho['mape']:.2%} on {ho['n']}" if ho else "") + " |")
    lines += ["", "| tokens | d_model | dense | coarse MoE | fine-grained + shared |", "|---|---|---|---|---|"]
    for m in r["matched_active"]:
        cell = lambda k: f"{m[k]['loss']:.4f}" if k in m else ""  # noqa: E731
        lines.append(f"| {m['tokens']:.2g} | {m['d_model']} | {cell('dense')} | {cell('coarse MoE')} | "
                     f"{cell('fine-grained + shared')} |")
    lines += ["", "| tokens | MoE family | d_model | INT4 MB | MoE loss | dense loss at the same INT4 MB | MoE - dense |",
              "|---|---|---|---|---|---|---|"]
    for m in r["matched_memory"]:
        lines.append(f"| {m['tokens']:.2g} | {m['family']} | {m['d_model']} | {m['int4_MB']:.2f} | {m['moe_loss']:.4f} | "
                     f"{m['dense_loss_at_same_memory']:.4f}{' (extrapolated)' if m['dense_extrapolated'] else ''} | "
                     f"{m['moe_minus_dense']:+.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    kind, path = sys.argv[1], sys.argv[2]
    render = {"runtime": runtime, "training": training, "remoe": remoe, "scaling": scaling}
    print(render[kind](json.loads(open(path).read())))
