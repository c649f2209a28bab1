"""``mobilemoe demo``: the main job of ``make run``, end to end on the embedded default corpus.

1. Train a tiny MobileMoE with ``recipes/tiny.yaml`` on the running Python's standard library
   (BPE tokenizer, pre-train then mid-train; resumable: a rerun skips finished stages).
2. Quantize the result to INT4 (``mobilemoe-int4-g32``).
3. Measure validation loss of the float and INT4 models next to the unigram baseline.
4. Generate a sample with the INT4 runtime and print accounting, loss and speed.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from mobilemoe.commands.common import print_json

PROMPT = "import os\n\n\ndef "


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train a tiny MobileMoE on the stdlib, quantize to INT4, generate (`make run`)",
                       description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="recipes/tiny.yaml", help="training recipe (default recipes/tiny.yaml)")
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--max-steps", type=int, default=None, help="cap every stage's steps (quick runs)")
    p.add_argument("--fresh", action="store_true", help="train from scratch even if OUT holds a finished run")
    p.add_argument("--tokens", type=int, default=64, help="tokens to generate (default 64)")
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


def run(args: argparse.Namespace) -> int:
    import shutil

    from mobilemoe.accounting import account
    from mobilemoe.commands.info import rows
    from mobilemoe.quant import quantize_checkpoint
    from mobilemoe.runtime import Engine, SamplingParams
    from mobilemoe.train.recipe import load_recipe
    from mobilemoe.train.run import run_recipe

    out = Path(args.out)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    recipe = load_recipe(args.recipe)
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
    prompt = engine.encode(PROMPT)
    # Seeded sampling: greedy decoding of a model this small collapses into repeated newlines.
    gen = engine.generate(prompt, args.tokens, SamplingParams(temperature=0.8, top_k=40, seed=args.seed))
    trained = [r for r in reports if not r.skipped]
    record = {
        "recipe": args.recipe, "out": str(out), "stages": [r.stage for r in reports],
        "train_seconds": round(train_s, 1),
        "train_tok_s": round(sum(r.tokens for r in trained) / max(sum(r.seconds for r in trained), 1e-9), 1)
        if trained else None,
        "train_loss_last": reports[-1].loss_last, "val_loss": losses,
        "val_ppl": {k: math.exp(v) for k, v in losses.items()},
        "int4_dir": str(int4), "backend": type(engine.backend).__name__,
        "sample": engine.tokenizer.decode(prompt + gen.ids),
        "prefill_tok_s": round(gen.prefill_tok_s, 1), "decode_tok_s": round(gen.decode_tok_s, 1),
        "accounting": account(cfg).to_dict(),
    }
    if args.json:
        print_json(record)
        return 0
    print(f"\n== mobilemoe demo: {cfg.num_hidden_layers} layers, d {cfg.hidden_size}, "
          f"{cfg.num_local_experts} experts top-{cfg.num_experts_per_tok} + shared, vocab {cfg.vocab_size}")
    for key, value in rows(account(cfg)):
        print(f"  {key:<32} {value}")
    done = "trained" if trained else "already trained (rerun with --fresh to retrain)"
    print(f"\n{' -> '.join(record['stages'])}: {done}"
          + (f", {record['train_tok_s']} tok/s" if trained else ""))
    print(f"validation loss (nats/token): float {losses['float']:.3f}, INT4 {losses['int4']:.3f}, "
          f"unigram baseline {losses['unigram']:.3f}")
    print(f"\nsample ({record['backend']}, temperature 0.8, top-k 40, seed {args.seed}):\n{record['sample']}\n")
    print(f"prefill {record['prefill_tok_s']} tok/s, decode {record['decode_tok_s']} tok/s")
    return 0
