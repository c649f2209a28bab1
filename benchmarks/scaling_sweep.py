"""The scaling-law issue's sweep on this CPU: dense, coarse MoE and fine-grained + shared MoE.

Trains (resumably, with ``mobilemoe.scaling.sweep``) three grids on the embedded stdlib corpus
(``recipes/sweep-tiny.yaml``) at two token budgets:

* dense models at d_model 64, 96, 128 (the MoE models' active sizes) and 192 (the INT4 memory of the
  d_model-96 MoE models; d_model 256, which would match the d_model-128 MoE models, takes too long on
  2 cores, so that comparison extrapolates the dense curve and is flagged);
* coarse MoE: 8 experts of a full FFN's width, top-1 (E=8, g=1, k=1);
* fine-grained + shared MoE, the MobileMoE shape: 64 slots of width d_ff/8, 4 isolated into one
  shared expert, top-4 of the other 60 (E=8, g=8, k=1, s=4);

then fits the joint law per family (dense runs are every MoE family's E=1 anchor) with bootstrap
intervals and held-out error, compares the families at matched active parameters and at matched INT4
memory (each MoE run against the dense runs interpolated to its memory, log-log), and plots loss vs
INT4 memory and vs active parameters. Prints JSON; writes OUT/result.json, OUT/law.yaml, OUT/sweep.png.

    python benchmarks/scaling_sweep.py --out runs/sweep

``--plan equal-memory`` (:func:`equal_memory_plan`) is the sweep that answers the equal-memory question
without extrapolating: the same MoE models; dense models at their active sizes (equal-active
comparison) plus, from ``mobilemoe.accounting``'s INT4 bytes, the dense sizes just below and just above
every MoE model's INT4 bytes (d192, d224, d256 with the tiers' depth rule: d256's 3.82 MB covers the
fine-grained d128's 3.81 MB); seeds 0, 1, 2; token budgets 1M (the earlier sweep's budget, so its
seed-0 rows are reused when its run table is there) and the largest of 4M/3M/2M/1.5M whose estimated
wall time fits ``--hours`` (default 6). The estimate is tokens x matmul params per token x a measured
rate (:func:`measured_rate`: from the run table's own finished runs when it has them, else the
2026-11-24 sweep's 25 minutes for its 20 runs); it counts only runs not yet done and is printed before
training starts. Resumable; meant for a workstation session, never CI:

    python benchmarks/scaling_sweep.py --plan equal-memory --out runs/sweep-em --dry-run
    python benchmarks/scaling_sweep.py --plan equal-memory --out runs/sweep-em
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

GRIDS = {  # cheapest first; the dense model at the MoE models' memory last (it is the slowest)
    "dense at the MoE models' active sizes": "d_model=64,96,128 E=1 head_dim=32 kv_heads=2 tokens={tokens}",
    "coarse MoE (8x top-1)": "d_model=64,96,128 E=8 g=1 k=1 s=0 head_dim=32 kv_heads=2 tokens={tokens}",
    "fine-grained + shared (60 top-4 + shared)": "d_model=64,96,128 E=8 g=8 k=1 s=4 head_dim=32 kv_heads=2 "
                                                 "tokens={tokens}",
    "dense at about the MoE models' INT4 memory": "d_model=192 E=1 head_dim=32 kv_heads=2 tokens={tokens}",
}
FAMILY_NAMES = {"dense": "dense", "k1-g1-s0": "coarse MoE", "k1-g8-s4": "fine-grained + shared"}

# ------------------------------------------------------------------ the equal-memory plan
ATTN = "head_dim=32 kv_heads=2"
MOE_GRIDS = {"coarse MoE (8x top-1)": "d_model=64,96,128 E=8 g=1 k=1 s=0",
             "fine-grained + shared (60 top-4 + shared)": "d_model=64,96,128 E=8 g=8 k=1 s=4"}
ACTIVE_DENSE = (64, 96, 128)  # the MoE models' d_model: the equal-active comparison
DENSE_CANDIDATES = (64, 96, 128, 160, 192, 224, 256, 288, 320, 384)  # multiples of head_dim 32
PLAN_SEEDS = (0, 1, 2)
LOW_TOKENS = 1_000_000  # the earlier sweep's budget: its seed-0 runs are reused, its numbers stay comparable
TOKEN_LADDER = (4_000_000, 3_000_000, 2_000_000, 1_500_000)  # the high budget: the largest that fits --hours
# Seconds per (token x matmul param per token), dense and MoE, when the table has no finished runs of
# its own. The 2026-11-24 sweep (BENCHMARKS.md) trained 6.31e12 dense and 4.86e12 MoE token x param in
# about 1500 s on 2 cores; a 2026-12-02 timing (d128, 16K vs 49K tokens, loaded machine) put a
# fine-grained MoE token x param at >= 2.5x a dense one. Solving 1500 = r (6.31e12 + 2.5 x 4.86e12):
MOE_COST_RATIO = 2.5
DEFAULT_RATES = {"dense": 1500 / (6.31e12 + MOE_COST_RATIO * 4.86e12)}
DEFAULT_RATES["moe"] = MOE_COST_RATIO * DEFAULT_RATES["dense"]


def _points(grid: str, vocab: int, tokens, seeds):
    from mobilemoe.scaling.sweep import parse_grid

    toks = ",".join(str(int(t)) for t in tokens)
    return parse_grid(f"{grid} {ATTN} tokens={toks} seed={','.join(map(str, seeds))}", defaults={"vocab": vocab})


def _int4(d_model: int, E: int, vocab: int, extra: str = "") -> int:
    from mobilemoe.scaling.space import stats

    (p,) = _points(f"d_model={d_model} E={E} {extra}", vocab, [1], [0])
    return stats(p.arch).int4_bytes


def bracketing_dense(vocab: int) -> list[int]:
    """Dense d_models: the MoE models' active sizes plus, for every MoE model's INT4 bytes, the
    largest candidate at or below it and the smallest at or above it (so the dense curve is
    interpolated at every MoE memory, never extrapolated)."""
    from mobilemoe.scaling.space import stats

    dense = {d: _int4(d, 1, vocab) for d in DENSE_CANDIDATES}
    chosen = set(ACTIVE_DENSE)
    for grid in MOE_GRIDS.values():
        for p in _points(grid, vocab, [1], [0]):
            b = stats(p.arch).int4_bytes
            below = [d for d, v in dense.items() if v <= b]
            above = [d for d, v in dense.items() if v >= b]
            if not below or not above:
                raise SystemExit(f"no dense candidate brackets {p.arch.label()} ({b / 1e6:.2f} MB INT4): "
                                 "extend DENSE_CANDIDATES")
            chosen |= {max(below, key=dense.get), min(above, key=dense.get)}
    return sorted(chosen)


def equal_memory_plan(vocab: int, tokens, seeds=PLAN_SEEDS) -> dict:
    """Grids (name -> points) of the equal-memory sweep, cheapest first."""
    dense = bracketing_dense(vocab)
    grids = {"dense (equal-active and bracketing the MoE INT4 bytes)":
             _points(f"d_model={','.join(map(str, dense))} E=1", vocab, tokens, seeds)}
    grids.update({name: _points(g, vocab, tokens, seeds) for name, g in MOE_GRIDS.items()})
    return grids


def measured_rate(rows: list[dict]) -> tuple[dict[str, float], str]:
    """Seconds per (token x matmul param per token) for dense and MoE runs, and where they came from:
    this table's finished runs of that kind when it has some (so the estimate sharpens as a resumed
    sweep goes on), else :data:`DEFAULT_RATES`."""
    from mobilemoe import accounting
    from mobilemoe.scaling.sweep import parse_grid

    work = {"dense": 0.0, "moe": 0.0}
    secs = {"dense": 0.0, "moe": 0.0}
    for r in rows:
        if r.get("status") != "done" or not r.get("seconds"):
            continue
        try:
            (p,) = parse_grid(f"d_model={r['d_model']} layers={r['layers']} E={r['E']} g={r['g']} k={r['k']} "
                              f"s={r['s']} vocab={r['vocab']} head_dim={r['head_dim']} kv_heads={r['kv_heads']} "
                              f"tokens={r['tokens']}")
        except (KeyError, ValueError):
            continue
        kind = "dense" if p.arch.is_dense else "moe"
        work[kind] += r["tokens"] * accounting.matmul_params_per_token(p.arch.to_config())
        secs[kind] += float(r["seconds"])
    rates = {k: secs[k] / work[k] if work[k] > 0 else DEFAULT_RATES[k] for k in work}
    measured = [k for k in work if work[k] > 0]
    source = (f"{'/'.join(measured)} measured on this table's finished runs" if measured else
              "defaults from the 2026-11-24 sweep")
    return rates, source


def estimate_seconds(points, rates: dict[str, float], done: set[str]) -> float:
    """Estimated wall time of the points not yet done."""
    from mobilemoe import accounting

    return sum(p.tokens * accounting.matmul_params_per_token(p.arch.to_config())
               * rates["dense" if p.arch.is_dense else "moe"] for p in points if p.key not in done)


def choose_tokens(vocab: int, hours: float, rate: dict[str, float], done: set[str]) -> tuple[int, float]:
    """The largest high budget of TOKEN_LADDER whose plan (with LOW_TOKENS) fits ``hours``."""
    for high in TOKEN_LADDER:
        pts = [p for ps in equal_memory_plan(vocab, (LOW_TOKENS, high)).values() for p in ps]
        est = estimate_seconds(pts, rate, done)
        if est <= hours * 3600:
            return high, est
    raise SystemExit(f"even {TOKEN_LADDER[-1]:.3g} tokens needs more than --hours {hours:g}; raise --hours")


def interp_loglog_se(x: float, pts: list[tuple[float, float, float | None]]
                     ) -> tuple[float, float | None, bool]:
    """Log-log interpolation of ``pts`` [(x, y, se of y)] at ``x``: (y, its standard error, extrapolated).

    The SE propagates the two neighbours' seed SEs through the interpolation weights in log space
    (independent runs); it leaves out how far the true curve bends between them."""
    pts = sorted(pts)
    lx = math.log(x)
    pair = next(((a, b) for a, b in zip(pts, pts[1:]) if a[0] <= x <= b[0]), None)
    extrap = pair is None
    if extrap:
        pair = (pts[0], pts[1]) if x < pts[0][0] else (pts[-2], pts[-1])
    (x0, y0, s0), (x1, y1, s1) = pair
    t = (lx - math.log(x0)) / (math.log(x1) - math.log(x0))
    y = math.exp((1 - t) * math.log(y0) + t * math.log(y1))
    if s0 is None or s1 is None:
        return y, None, extrap
    return y, y * math.hypot((1 - t) * s0 / y0, t * s1 / y1), extrap


def _combined_se(a: float | None, b: float | None) -> float | None:
    """The SE of a difference of two independent estimates (None when either has none)."""
    return None if a is None or b is None else math.hypot(a, b)


def verdict(diff: float, se: float | None, z: float = 2.0) -> str:
    """MoE minus dense loss -> 'MoE better' / 'MoE worse' / 'not distinguishable' at |diff| > z SE."""
    if se is None or not math.isfinite(se) or se == 0:
        return "one seed: no verdict"
    if diff < -z * se:
        return "MoE better"
    if diff > z * se:
        return "MoE worse"
    return "not distinguishable"


def compare(rows: list[dict]) -> dict:
    """Matched-active and matched-memory comparisons at each token budget, each MoE-minus-dense
    difference with its standard error (seed SEs combined) and a verdict at 2 SE (about 95%)."""
    out: dict = {"matched_active": [], "matched_memory": []}
    for tokens in sorted({r["tokens"] for r in rows}):
        at = [r for r in rows if r["tokens"] == tokens]
        dense = [r for r in at if r["family"] == "dense"]
        for d in sorted({r["d_model"] for r in at if r["family"] != "dense"}):
            entry = {"tokens": tokens, "d_model": d}
            base = next((r for r in dense if r["d_model"] == d), None)
            for r in at:
                if r["d_model"] == d:
                    name = FAMILY_NAMES.get(r["family"], r["family"])
                    entry[name] = {"loss": r["loss"], "se": r.get("se"), "n": r.get("n", 1),
                                   "active_M": r["n_act"] / 1e6, "int4_MB": r["int4_bytes"] / 1e6}
                    if base is not None and r is not base:
                        diff, se = r["loss"] - base["loss"], _combined_se(r.get("se"), base.get("se"))
                        entry[name].update(minus_dense=diff, minus_dense_se=se, verdict=verdict(diff, se))
            out["matched_active"].append(entry)
        pts = [(r["int4_bytes"], r["loss"], r.get("se")) for r in dense]
        for r in at:
            if r["family"] == "dense" or len(pts) < 2:
                continue
            dense_loss, dense_se, extrap = interp_loglog_se(r["int4_bytes"], pts)
            diff = r["loss"] - dense_loss
            se = _combined_se(r.get("se"), dense_se)
            out["matched_memory"].append({
                "tokens": tokens, "family": FAMILY_NAMES.get(r["family"], r["family"]), "d_model": r["d_model"],
                "int4_MB": r["int4_bytes"] / 1e6, "moe_loss": r["loss"], "moe_se": r.get("se"),
                "dense_loss_at_same_memory": dense_loss, "dense_se": dense_se,
                "moe_minus_dense": diff, "moe_minus_dense_se": se, "verdict": verdict(diff, se),
                "dense_extrapolated": extrap})
    return out


TIERS = ("mobilemoe-s", "mobilemoe-m", "mobilemoe-l")
TIER_TOKENS = (2_000_000, 1_000_000_000_000)  # the sweep's budget, and a pretraining-scale one


def tier_predictions(fits, tokens_list=TIER_TOKENS, ci: float = 0.9) -> list[dict]:
    """What the fitted laws say at the published tiers: the fine-grained + shared law at the tier's
    active params and E, beside the dense law at the dense size with the tier's INT4 bytes, with
    bootstrap intervals. Far outside the fitted range (the sweep's models are 1000x smaller)."""
    from mobilemoe.scaling.space import Arch, rule_layers, stats, tier_arch

    by_family = {f.family: f for f in fits}
    moe_fit, dense_fit = by_family.get("k1-g8-s4"), by_family.get("dense")
    if moe_fit is None or dense_fit is None:
        return []
    out = []
    for name in TIERS:
        st = stats(tier_arch(name))
        dense_st = min((stats(Arch(d_model=d, layers=rule_layers(d), vocab=st.arch.vocab, head_dim=64, kv_heads=4))
                        for d in range(256, 4097, 32)), key=lambda x: abs(x.int4_bytes - st.int4_bytes))
        for tokens in tokens_list:
            m, m_lo, m_hi = moe_fit.predict_interval(st.active_params, tokens, st.arch.e_law, ci)
            d, d_lo, d_hi = dense_fit.predict_interval(dense_st.active_params, tokens, 1.0, ci)
            diffs = [float(a.predict(st.active_params, tokens, st.arch.e_law) - b.predict(dense_st.active_params, tokens))
                     for a, b in zip(moe_fit.samples, dense_fit.samples)]
            lo, hi = ((float(np.percentile(diffs, 100 * (1 - ci) / 2)), float(np.percentile(diffs, 100 * (1 + ci) / 2)))
                      if diffs else (float("nan"), float("nan")))
            out.append({"tier": name, "tokens": tokens, "int4_MB": st.int4_bytes / 1e6,
                        "moe_active_M": st.active_params / 1e6, "dense_equal_memory": dense_st.arch.label(),
                        "dense_active_M": dense_st.active_params / 1e6,
                        "moe_loss": m, "moe_interval": [m_lo, m_hi], "dense_loss": d, "dense_interval": [d_lo, d_hi],
                        "moe_minus_dense": m - d, "moe_minus_dense_interval": [lo, hi], "ci": ci})
    return out


def plot(rows: list[dict], law, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    colors = {"dense": "tab:orange", "k1-g1-s0": "tab:gray", "k1-g8-s4": "tab:blue"}
    for fam, color in colors.items():
        for tokens, style in zip(sorted({r["tokens"] for r in rows}), ("--", "-")):
            rs = sorted((r for r in rows if r["family"] == fam and r["tokens"] == tokens), key=lambda r: r["n_act"])
            if not rs:
                continue
            label = f"{FAMILY_NAMES[fam]}, {tokens / 1e6:g}M tokens"
            err = [r.get("se") or 0.0 for r in rs]  # seed standard errors
            axes[0].errorbar([r["int4_bytes"] / 1e6 for r in rs], [r["loss"] for r in rs], yerr=err, fmt=style,
                             marker="o", color=color, label=label, capsize=3)
            axes[1].errorbar([r["n_act"] / 1e6 for r in rs], [r["loss"] for r in rs], yerr=err, fmt=style,
                             marker="o", color=color, label=label, capsize=3)
            p = law.families.get(fam) if law is not None else None
            if p is not None:  # the fitted law along the same active sizes
                n = np.geomspace(rs[0]["n_act"], rs[-1]["n_act"], 30)
                axes[1].plot(n / 1e6, p.predict(n, tokens, rs[0]["e"]), ":", color=color, lw=1)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("INT4 weight memory (MB)")
    axes[0].set_title("matched memory: loss vs INT4 bytes")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("active parameters (M)")
    axes[1].set_title("matched compute: loss vs active params (dotted: fitted law; bars: seed SE)")
    for ax in axes:
        ax.set_ylabel("validation loss (nats/token)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/sweep-tiny.yaml")
    ap.add_argument("--out", default="runs/sweep")
    ap.add_argument("--tokens", default="4e5,1e6", help="token budgets (comma-separated)")
    ap.add_argument("--bootstrap", type=int, default=50)
    ap.add_argument("--holdout", type=float, default=0.2)
    ap.add_argument("--fit-only", action="store_true", help="fit and plot the existing run table")
    ap.add_argument("--plan", choices=["equal-memory"], help="a named sweep instead of GRIDS x --tokens")
    ap.add_argument("--hours", type=float, default=6.0, help="--plan: wall-time budget that picks the token budget")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and its estimated wall time; train nothing")
    args = ap.parse_args()

    from mobilemoe.scaling.law import fit_table, read_runs
    from mobilemoe.scaling.sweep import (RunTable, format_summary, parse_grid, recipe_train_one, recipe_vocab,
                                         run_sweep, summarize)

    out = Path(args.out)
    table = out / "runs.jsonl"
    if not args.fit_only:
        vocab = recipe_vocab(args.recipe)
        if args.plan:
            done = RunTable(table).done()
            rate, source = measured_rate(RunTable(table).rows())
            high, est = choose_tokens(vocab, args.hours, rate, done)
            grids = equal_memory_plan(vocab, (LOW_TOKENS, high))
        else:
            grids = {name: parse_grid(grid.format(tokens=args.tokens), defaults={"vocab": vocab})
                     for name, grid in GRIDS.items()}
            done, (rate, source) = RunTable(table).done(), measured_rate(RunTable(table).rows())
            est = estimate_seconds([p for ps in grids.values() for p in ps], rate, done)
        if args.plan:
            print(f"plan {args.plan}: dense d_model {', '.join(map(str, bracketing_dense(vocab)))}; seeds "
                  f"{', '.join(map(str, PLAN_SEEDS))}; tokens {LOW_TOKENS:.3g} and {high:.3g} (the largest of "
                  f"{', '.join(f'{t:.3g}' for t in TOKEN_LADDER)} that fits --hours {args.hours:g})", flush=True)
        n = sum(len(ps) for ps in grids.values())
        todo = sum(p.key not in done for ps in grids.values() for p in ps)
        print(f"plan: {n} runs ({todo} to train), estimated {est / 3600:.1f} h at "
              f"{1 / rate['dense']:.3g} (dense) / {1 / rate['moe']:.3g} (MoE) token x param/s ({source})", flush=True)
        if args.dry_run:
            for name, ps in grids.items():
                print(f"== {name}")
                for p in ps:
                    print(f"  {'done' if p.key in done else 'todo'} {p.key}  {p.arch.label()}  seed {p.seed}")
            return
        train_one = recipe_train_one(args.recipe)
        for name, points in grids.items():
            print(f"== {name}", flush=True)
            run_sweep(points, train_one, table, out, log=lambda m: print(m, flush=True))
    points = summarize(RunTable(table).rows())  # mean +- SE over seeds per point
    rows = [{**g, "loss": g["mean"]} for g in points]  # comparisons and plots use the seed means
    law, fits = fit_table(read_runs(table), bootstrap=args.bootstrap, holdout=args.holdout, n_starts=16)
    law.save(out / "law.yaml")
    result = {
        # one row per point, loss = the seed mean (+ se, n): benchmarks/report.py's "scaling" table
        "runs": sum(g["n"] for g in points), "table": rows,
        "fits": [f.to_dict() for f in fits], "skipped_fits": law.meta.get("skipped"),
        **compare(rows),
        "tiers": tier_predictions(fits),
    }
    print(format_summary(points))
    plot(rows, law, out / "sweep.png")
    (out / "result.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "table"}, indent=2, default=float))


if __name__ == "__main__":
    main()
