"""Speed of two source trees of mobilemoe, alternating in one run: did a refactor change the speed?

Runs ``python -m mobilemoe bench --json`` (MoE and dense, decode and prefill at each context) with
``PYTHONPATH=<tree>/src`` for each tree, in the order old, new, new, old, old, new, ... (so drift on
a shared machine falls on both), and reports the per-tree median of every number and the ratio
new / old. Each tree needs its own built extension (``python setup.py build_ext --inplace`` there).
The random-weight models are written once to ``--cache-dir`` and shared. Prints JSON; ``--out``
writes it too.

    python benchmarks/tree_speed.py --old /tmp/old-tree --new . --rounds 3 --isa avx512
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from tqdm import tqdm

KEYS = ("moe_decode_tok_s", "dense_decode_tok_s", "moe_prefill_tok_s", "dense_prefill_tok_s")


def bench_once(tree: Path, args: argparse.Namespace) -> dict[str, float]:
    """One ``mobilemoe bench`` of ``tree``: {"moe_decode_tok_s_256": ..., ...} of the native runtime."""
    env = dict(os.environ, PYTHONPATH=str(tree / "src"))
    if args.isa:
        env["MOBILEMOE_KERNEL_ISA"] = args.isa
    cmd = [sys.executable, "-m", "mobilemoe", "bench", "--json", "--contexts", args.contexts,
           "--decode-tokens", str(args.decode_tokens), "--repeats", str(args.repeats), "--threads", str(args.threads),
           "--cache-dir", args.cache_dir]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tree)
    if res.returncode != 0:
        raise SystemExit(f"tree_speed: bench of {tree} failed (exit {res.returncode}): {res.stderr.strip()[-500:]}")
    report = json.loads(res.stdout)
    runtimes = [r for r in report["by_runtime"] if r != "ceilings"]
    data = report["by_runtime"][runtimes[0]]
    return {f"{k}_{c}": float(data[f"{k}_{c}"]) for k in KEYS for c in args.contexts.split(",")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", required=True, type=Path, help="the baseline source tree")
    p.add_argument("--new", required=True, type=Path, help="the changed source tree")
    p.add_argument("--rounds", type=int, default=3, help="bench runs per tree (default 3)")
    p.add_argument("--contexts", default="256,1024")
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--isa", default=None, help="MOBILEMOE_KERNEL_ISA for both trees (default: each tree's best)")
    p.add_argument("--cache-dir", default=str(Path("runs/bench-models").resolve()))
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args()
    trees = {"old": args.old.resolve(), "new": args.new.resolve()}
    order = [name for r in range(args.rounds) for name in (("old", "new") if r % 2 == 0 else ("new", "old"))]
    runs: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
    for name in tqdm(order, desc="bench runs", unit="run"):
        runs[name].append(bench_once(trees[name], args))
    median = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    ratio = {k: median["new"][k] / median["old"][k] for k in median["new"]}
    result = {"trees": {k: str(v) for k, v in trees.items()}, "order": order, "isa": args.isa,
              "threads": args.threads, "runs": runs, "median": median, "ratio_new_over_old": ratio,
              "min_ratio": min(ratio.values())}
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
