"""``mobilemoe sweep``: train a grid of small models for the scaling law, then fit it."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "sweep", help="train a grid of small models (resumable run table) and fit the scaling law",
        description="Train every point of --grid with the recipe's data and optimiser settings (its first "
                    "stage, or --stage), one run per directory under --out, and record each finished run "
                    "(config fields, tokens, final validation loss, accounting) in the JSONL run table; "
                    "finished runs are skipped on restart. --fit LAW fits the joint MoE scaling law to the "
                    "table and writes it for `mobilemoe plan --law LAW`. Without RECIPE only the fit runs; with "
                    "neither RECIPE nor --fit, `--table JSONL` prints the table grouped by point: loss mean "
                    "+- standard error over seeds, and n. seed=0,1,2 is a grid axis (each seed changes the "
                    "initialisation and the data order; fits use every seed's run, bootstrap over points). "
                    "Grid example: 'd_model=128,192 layers=4 E=1,4,8 g=1,4 k=1 s=0,half tokens=2e6,4e6 seed=0,1,2'.")
    p.add_argument("recipe", nargs="?", metavar="RECIPE.yaml", help="training recipe (omit to only --fit a table)")
    p.add_argument("--grid", help="the grid: name=v1,v2 ... over d_model, layers (or 'rule'), E, g, k, s "
                                  "(or 'half'), vocab, ffn_ratio, head_dim, kv_heads, heads, tokens, seed")
    p.add_argument("--out", metavar="DIR", default="runs/sweep", help="run directories (default runs/sweep)")
    p.add_argument("--table", metavar="JSONL", help="run table (default OUT/runs.jsonl)")
    p.add_argument("--stage", help="recipe stage whose settings to use (default: the first)")
    p.add_argument("--dry-run", action="store_true", help="list the grid's points and which are done; train nothing")
    p.add_argument("--fit", metavar="LAW", help="fit the law to the table and write it (YAML or JSON)")
    p.add_argument("--bootstrap", type=int, default=50, help="bootstrap resamples for intervals (50)")
    p.add_argument("--holdout", type=float, default=0.2, help="fraction of runs held out to report error (0.2)")
    p.add_argument("--holdout-mode", choices=["random", "largest"], default="random",
                   help="which runs to hold out: random, or the largest-compute ones (extrapolation test)")
    p.add_argument("--starts", type=int, default=16, help="L-BFGS starts per fit (16)")
    p.add_argument("--summary", action="store_true",
                   help="also print the per-point table (mean +- SE over seeds) after training/fitting")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mobilemoe.commands.common import print_json
    from mobilemoe.errors import MobileMoEError
    from mobilemoe.scaling.law import fit_table, read_runs
    from mobilemoe.scaling.sweep import (RunTable, format_summary, parse_grid, recipe_train_one, recipe_vocab,
                                         run_sweep, summarize)

    table = Path(args.table or Path(args.out) / "runs.jsonl")
    summary: dict = {"table": str(table)}
    if args.recipe:
        if not args.grid:
            raise MobileMoEError("give --grid with RECIPE (e.g. --grid 'd_model=128,192 E=1,4,8 tokens=2e6')")
        points = parse_grid(args.grid, defaults={"vocab": recipe_vocab(args.recipe)})
        if not points:
            raise MobileMoEError(f"--grid {args.grid!r} has no valid architecture (check E >= k, s < k*g, g | 4*d_model)")
        if args.dry_run:
            done = RunTable(table).done()
            rows = [{"key": p.key, "label": p.arch.label(), "tokens": p.tokens, "seed": p.seed, "done": p.key in done}
                    for p in points]
            if args.json:
                print_json(rows)
            else:
                for r in rows:
                    print(f"{'done ' if r['done'] else 'todo '} {r['key']}  {r['label']}  {r['tokens']:.3g} tokens"
                          f"  seed {r['seed']}")
            return 0
        log = None if args.json else print
        summary["sweep"] = run_sweep(points, recipe_train_one(args.recipe, args.stage), table, args.out, log=log)
    elif not args.fit:
        if not args.table:
            raise MobileMoEError("give RECIPE.yaml --grid ... to train, --fit LAW to fit the run table, "
                                 "or --table JSONL to print it grouped by point")
        args.summary = True
    if args.fit:
        runs = read_runs(table)
        law, results = fit_table(runs, bootstrap=args.bootstrap, holdout=args.holdout, n_starts=args.starts,
                                  holdout_mode=args.holdout_mode)
        law.save(args.fit)
        summary["fit"] = {"law": args.fit, "fits": [r.to_dict() for r in results], "skipped": law.meta.get("skipped")}
        if not args.json:
            for r in results:
                p = r.params
                form = "joint (E terms fitted)" if r.joint else f"single-E Chinchilla form (E={p.e_fixed:g})"
                print(f"family {r.family}: {r.n_runs} runs at {r.n_points} points, {form}, in-sample RMSE(log loss) {r.rmse_log:.4f}"
                      + (f", held-out ({r.heldout['mode']}) MAPE {r.heldout['mape']:.2%} on {r.heldout['n']} runs"
                   if r.heldout else ""))
                for name in ("a", "alpha", "b", "beta", "c", "delta", "gamma", "omega", "zeta"):
                    if not r.joint and name in ("delta", "gamma", "omega", "zeta"):
                        continue
                    ci = r.intervals.get(name)
                    ci_s = f"  [{ci[0]:.4g}, {ci[1]:.4g}]" if ci else ""
                    print(f"    {name:<6} {getattr(p, name):.5g}{ci_s}")
            for fam, why in (law.meta.get("skipped") or {}).items():
                print(f"family {fam}: not fitted ({why})")
            print(f"law -> {args.fit} (use: mobilemoe plan --law {args.fit} ...)")
    if args.summary:
        if not table.is_file():
            raise MobileMoEError(f"{table}: no such run table")
        groups = summarize(RunTable(table).rows())
        if not groups:
            raise MobileMoEError(f"{table}: no finished runs (rows with status done and a loss)")
        summary["points"] = groups
        if not args.json:
            print(format_summary(groups))
    if args.json:
        print_json(summary)
    return 0
