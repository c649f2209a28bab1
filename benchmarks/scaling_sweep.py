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
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

GRIDS = {  # cheapest first; the dense model at the MoE models' memory last (it is the slowest)
    "dense at the MoE models' active sizes": "d_model=64,96,128 E=1 head_dim=32 kv_heads=2 tokens={tokens}",
    "coarse MoE (8x top-1)": "d_model=64,96,128 E=8 g=1 k=1 s=0 head_dim=32 kv_heads=2 tokens={tokens}",
    "fine-grained + shared (60 top-4 + shared)": "d_model=64,96,128 E=8 g=8 k=1 s=4 head_dim=32 kv_heads=2 "
                                                 "tokens={tokens}",
    "dense at about the MoE models' INT4 memory": "d_model=192 E=1 head_dim=32 kv_heads=2 tokens={tokens}",
}
FAMILY_NAMES = {"dense": "dense", "k1-g1-s0": "coarse MoE", "k1-g8-s4": "fine-grained + shared"}


def interp_loglog(x: float, pts: list[tuple[float, float]]) -> tuple[float, bool]:
    """Loss at memory ``x`` from (memory, loss) points, linear in log-log; (value, extrapolated)."""
    pts = sorted(pts)
    lx = math.log(x)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            t = (lx - math.log(x0)) / (math.log(x1) - math.log(x0))
            return math.exp((1 - t) * math.log(y0) + t * math.log(y1)), False
    (x0, y0), (x1, y1) = (pts[0], pts[1]) if x < pts[0][0] else (pts[-2], pts[-1])
    t = (lx - math.log(x0)) / (math.log(x1) - math.log(x0))
    return math.exp((1 - t) * math.log(y0) + t * math.log(y1)), True


def compare(rows: list[dict]) -> dict:
    """Matched-active and matched-memory comparisons at each token budget."""
    out: dict = {"matched_active": [], "matched_memory": []}
    for tokens in sorted({r["tokens"] for r in rows}):
        at = [r for r in rows if r["tokens"] == tokens]
        dense = [r for r in at if r["family"] == "dense"]
        for d in sorted({r["d_model"] for r in at if r["family"] != "dense"}):
            entry = {"tokens": tokens, "d_model": d}
            for r in at:
                if r["d_model"] == d:
                    entry[FAMILY_NAMES.get(r["family"], r["family"])] = {
                        "loss": r["loss"], "active_M": r["n_act"] / 1e6, "int4_MB": r["int4_bytes"] / 1e6}
            out["matched_active"].append(entry)
        pts = [(r["int4_bytes"], r["loss"]) for r in dense]
        for r in at:
            if r["family"] == "dense" or len(pts) < 2:
                continue
            dense_loss, extrap = interp_loglog(r["int4_bytes"], pts)
            out["matched_memory"].append({
                "tokens": tokens, "family": FAMILY_NAMES.get(r["family"], r["family"]), "d_model": r["d_model"],
                "int4_MB": r["int4_bytes"] / 1e6, "moe_loss": r["loss"], "dense_loss_at_same_memory": dense_loss,
                "moe_minus_dense": r["loss"] - dense_loss, "dense_extrapolated": extrap})
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
            axes[0].plot([r["int4_bytes"] / 1e6 for r in rs], [r["loss"] for r in rs], style, marker="o",
                         color=color, label=label)
            axes[1].plot([r["n_act"] / 1e6 for r in rs], [r["loss"] for r in rs], style, marker="o", color=color,
                         label=label)
            p = law.families.get(fam) if law is not None else None
            if p is not None:  # the fitted law along the same active sizes
                n = np.geomspace(rs[0]["n_act"], rs[-1]["n_act"], 30)
                axes[1].plot(n / 1e6, p.predict(n, tokens, rs[0]["e"]), ":", color=color, lw=1)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("INT4 weight memory (MB)")
    axes[0].set_title("matched memory: loss vs INT4 bytes")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("active parameters (M)")
    axes[1].set_title("matched compute: loss vs active params (dotted: fitted law)")
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
    args = ap.parse_args()

    from mobilemoe.scaling.law import fit_table, read_runs
    from mobilemoe.scaling.sweep import RunTable, parse_grid, recipe_train_one, recipe_vocab, run_sweep

    out = Path(args.out)
    table = out / "runs.jsonl"
    if not args.fit_only:
        train_one = recipe_train_one(args.recipe)
        vocab = recipe_vocab(args.recipe)
        for name, grid in GRIDS.items():
            print(f"== {name}", flush=True)
            points = parse_grid(grid.format(tokens=args.tokens), defaults={"vocab": vocab})
            run_sweep(points, train_one, table, out, log=lambda m: print(m, flush=True))
    rows = [r for r in RunTable(table).latest().values() if r.get("status") == "done"]
    law, fits = fit_table(read_runs(table), bootstrap=args.bootstrap, holdout=args.holdout, n_starts=16)
    law.save(out / "law.yaml")
    result = {
        "runs": len(rows),
        "table": [{k: r[k] for k in ("label", "family", "tokens", "n_act", "total_params", "int4_bytes", "loss",
                                     "seconds")} for r in sorted(rows, key=lambda r: (r["family"], r["n_act"], r["tokens"]))],
        "fits": [f.to_dict() for f in fits], "skipped_fits": law.meta.get("skipped"),
        **compare(rows),
    }
    plot(rows, law, out / "sweep.png")
    (out / "result.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "table"}, indent=2, default=float))


if __name__ == "__main__":
    main()
