"""``mobilemoe demo``: the main job of ``make run``, end to end on the embedded default corpus.

1. Train a small MobileMoE with ``recipes/tiny.yaml`` on the running Python's standard library
   (BPE tokenizer, pre-train then mid-train; about 3-4 minutes on 2 quiet CPU cores; resumable:
   a rerun into the same OUT skips finished stages).
2. Quantize the result to INT4 (``mobilemoe-int4-g32``).
3. Measure validation loss of the float and INT4 models next to the unigram baseline.
4. Generate a sample with the INT4 runtime and print accounting, loss, speed and wall time.

``--max-steps N`` runs every stage for N steps, a quick look; without ``--out`` it writes to
``runs/demo-steps-N``, so it never mixes with (or blocks) the full run in ``runs/demo``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from mobilemoe.commands.common import print_json
from mobilemoe.errors import MobileMoEError

DEFAULT_OUT = "runs/demo"
PROMPT = "import os\nimport sys\n\n\ndef "


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train a small MobileMoE on the stdlib, quantize to INT4, generate (`make run`)",
                       description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="recipes/tiny.yaml", help="training recipe (default recipes/tiny.yaml)")
    p.add_argument("--out", default=None,
                   help=f"output directory (default {DEFAULT_OUT}; with --max-steps N: runs/demo-steps-N)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="run every stage for N steps instead of the recipe's (a quick look)")
    p.add_argument("--fresh", action="store_true", help="train from scratch even if OUT holds a finished run")
    p.add_argument("--prompt", default=PROMPT, help="prompt of the sample (default: %(default)r)")
    p.add_argument("--tokens", type=int, default=120, help="tokens to generate (default 120)")
    p.add_argument("--temperature", type=float, default=0.4, help="sampling temperature, 0 = greedy (default 0.4)")
    p.add_argument("--top-k", type=int, default=10, help="sample among the k likeliest tokens (default 10)")
    p.add_argument("--val-tokens", type=int, default=16384, help="validation tokens scored (default 16384)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed for the generated sample")
    p.add_argument("--json", action="store_true", help="print a JSON record")
    p.set_defaults(func=run)


def unigram_loss(train_tokens, val_tokens, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of an add-one unigram model fitted on train, scored on validation."""
    import numpy as np

    counts = np.bincount(np.asarray(train_tokens, dtype=np.int64), minlength=vocab_size) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[np.asarray(val_tokens, dtype=np.int64)].mean())


def _shard_tokens(run_dir: Path, split: str):
    """All tokens of one split of the run's token shards (any stage's: same tokenizer, same corpus)."""
    import numpy as np

    from mobilemoe.data.shards import load_index

    directory = sorted((run_dir / "data").glob(f"*/{split}"))[0]
    return np.concatenate([np.asarray(a) for a in load_index(directory).arrays()])


def _val_loss(ckpt: Path, ids: list[int], window: int) -> float:
    from mobilemoe.eval.lm import load_eval_lm
    from mobilemoe.eval.perplexity import perplexity_ids

    lm = load_eval_lm(ckpt, max_length=window)
    nll, count, _, _ = perplexity_ids(lm, ids, window=window, stride=window)
    return nll / count


def _check_args(args: argparse.Namespace) -> None:
    """One clear line for values that would otherwise fail deep inside training or generation."""
    if args.max_steps is not None and args.max_steps < 1:
        raise MobileMoEError(f"--max-steps must be >= 1, got {args.max_steps}")
    if args.tokens < 1:
        raise MobileMoEError(f"--tokens must be >= 1, got {args.tokens}")
    if args.val_tokens < 2:
        raise MobileMoEError(f"--val-tokens must be >= 2, got {args.val_tokens}")
    if not args.prompt:
        raise MobileMoEError("--prompt must not be empty")


def planned_steps(recipe, max_steps: int | None) -> dict[str, int | None]:
    """Optimizer steps each stage of ``recipe`` runs in one process (``max_steps`` replaces them all).

    None for a stage whose length the recipe leaves open (a string ``tokens``); training refuses it.
    """
    def steps(s) -> int | None:
        if max_steps is not None or s.max_steps is not None:
            return max_steps if max_steps is not None else s.max_steps
        return math.ceil(s.tokens / s.tokens_per_step(1)) if isinstance(s.tokens, int) else None
    return {s.name: steps(s) for s in recipe.stages}


def check_resumable(out: Path, steps: dict[str, int | None]) -> None:
    """Refuse to reuse a finished stage trained for another step count (a quick look is not the full run).

    Resume skips a finished stage without looking at its length, so without this check a full
    ``demo`` into an OUT that holds a ``--max-steps 20`` run would report that run as the result.
    """
    for stage, want in steps.items():
        summary = out / stage / "final" / "train_summary.json"
        if want is None or not summary.exists():
            continue
        done = json.loads(summary.read_text()).get("step")
        if done != want:
            raise MobileMoEError(f"{out} holds a {stage} stage trained for {done} steps, but this run asks for "
                                 f"{want}: pass --fresh to retrain it there, or choose another --out")


def run(args: argparse.Namespace) -> int:
    import shutil

    from mobilemoe.accounting import account
    from mobilemoe.quant import quantize_checkpoint
    from mobilemoe.runtime import Engine, SamplingParams
    from mobilemoe.train.recipe import load_recipe
    from mobilemoe.train.run import run_recipe

    t_start = time.perf_counter()
    _check_args(args)
    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    out = Path(args.out if args.out is not None else
               DEFAULT_OUT if args.max_steps is None else f"{DEFAULT_OUT}-steps-{args.max_steps}")
    recipe = load_recipe(args.recipe)
    steps = planned_steps(recipe, args.max_steps)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    check_resumable(out, steps)
    t0 = time.perf_counter()
    reports = run_recipe(recipe, out, resume=True, max_steps=args.max_steps, progress=not args.json)
    train_s = time.perf_counter() - t0
    final = Path(reports[-1].final_dir)
    int4 = out / "int4"
    quantize_checkpoint(final, int4, overwrite=True)

    engine = Engine.load(int4)
    cfg = engine.config
    window = min(256, cfg.max_position_embeddings)
    val = _shard_tokens(out, "val")[: args.val_tokens].tolist()
    losses = {"float": _val_loss(final, val, window), "int4": _val_loss(int4, val, window),
              "unigram": unigram_loss(_shard_tokens(out, "train"), val[1:], cfg.vocab_size)}
    prompt = engine.encode(args.prompt)
    gen = engine.generate(prompt, args.tokens, sampling)
    trained = [r for r in reports if not r.skipped]
    record = {
        "recipe": args.recipe, "out": str(out), "stages": [r.stage for r in reports], "steps": steps,
        "trained": bool(trained), "train_seconds": round(train_s, 1),
        "train_tok_s": round(sum(r.tokens for r in trained) / max(sum(r.seconds for r in trained), 1e-9), 1)
        if trained else None,
        "train_loss_last": reports[-1].loss_last, "val_loss": losses, "val_tokens": len(val),
        "val_ppl": {k: math.exp(v) for k, v in losses.items()},
        "int4_dir": str(int4), "backend": type(engine.backend).__name__,
        "prompt": args.prompt, "sampling": {"temperature": args.temperature, "top_k": args.top_k, "seed": args.seed},
        "sample": engine.tokenizer.decode(prompt + gen.ids), "sample_tokens": len(gen.ids),
        "prefill_tok_s": round(gen.prefill_tok_s, 1), "decode_tok_s": round(gen.decode_tok_s, 1),
        "accounting": account(cfg).to_dict(),
        "wall_seconds": round(time.perf_counter() - t_start, 1),
    }
    if args.json:
        print_json(record)
    else:
        print_report(record, account(cfg), cfg)
    return 0


def print_report(record: dict, accounting, cfg) -> None:
    """The human-readable report: the model, then a closing note with wall time, loss and the sample."""
    from mobilemoe.commands.info import rows

    print(f"\n== mobilemoe demo: {cfg.num_hidden_layers} layers, d {cfg.hidden_size}, "
          f"{cfg.num_local_experts} experts top-{cfg.num_experts_per_tok} + shared, vocab {cfg.vocab_size}")
    for key, value in rows(accounting):
        print(f"  {key:<32} {value}")
    stages = " -> ".join(f"{name} {n} steps" for name, n in record["steps"].items())
    if record["trained"]:
        done = f"trained in {record['train_seconds']} s, {record['train_tok_s']} tok/s"
    else:
        done = f"already trained in {record['out']} (rerun with --fresh to retrain)"
    print(f"\n{stages}: {done}")
    print(f"INT4 model: {record['int4_dir']} ({record['backend']}), "
          f"prefill {record['prefill_tok_s']} tok/s, decode {record['decode_tok_s']} tok/s")
    losses, s = record["val_loss"], record["sampling"]
    print(f"\n== done in {record['wall_seconds']} s (wall time)")
    print(f"validation loss, nats/token over {record['val_tokens']} held-out tokens: float {losses['float']:.3f}, "
          f"INT4 {losses['int4']:.3f} (unigram baseline {losses['unigram']:.3f})")
    mode = ("greedy" if s["temperature"] == 0
            else f"temperature {s['temperature']}, top-k {s['top_k']}, seed {s['seed']}")
    rule = "-" * 72
    print(f"sample from the INT4 model ({record['sample_tokens']} new tokens, {mode}), prompt {record['prompt']!r}:")
    print(f"{rule}\n{record['sample'].rstrip()}\n{rule}")
