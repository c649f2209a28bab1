"""``mobilemoe train RECIPE.yaml``: run a training recipe's stages (pretrain -> midtrain -> sft -> qat)."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a model from a YAML recipe (stages chained through checkpoints)",
        description="Run the stages of a training recipe in order (pretrain, midtrain, sft, qat), each "
                    "starting from the previous stage's final checkpoint. Metrics go to OUT/<stage>/metrics.jsonl, "
                    "checkpoints to OUT/<stage>/checkpoints, the stage's model to OUT/<stage>/final. "
                    "For several processes launch with torchrun, e.g. "
                    "`torchrun --nproc-per-node 2 -m mobilemoe.cli train recipes/tiny.yaml`. OUT is locked while "
                    "a run writes it: a second `train` into the same OUT is refused.")
    p.add_argument("recipe", metavar="RECIPE.yaml", help="a recipe file (see recipes/)")
    p.add_argument("--stage", choices=["pretrain", "midtrain", "sft", "qat"],
                   help="run only this stage (from --init, or the previous stage's OUT/<prev>/final)")
    p.add_argument("--init", metavar="CKPT", help="checkpoint directory to start from (instead of a fresh "
                                                   "init or the previous stage's output)")
    p.add_argument("--out", metavar="DIR", help="output directory (default: runs/<recipe name>)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue exactly from the newest readable checkpoint in OUT (a damaged one falls "
                            "back to the one before it, with a warning); finished stages are skipped, stages "
                            "without a checkpoint start over")
    again.add_argument("--force", action="store_true",
                       help="delete the output of the stages being run (OUT/<stage>/, and for a whole-chain run "
                            "OUT/tokenizer.json) and start over; without --resume or --force a stage whose "
                            "directory already holds output is refused")
    p.add_argument("--max-steps", type=int, metavar="N",
                   help="override every stage's step count (the LR schedule spans N steps)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None,
                   help="train on this device (overrides the stages' `device`, default auto: CUDA when present; "
                        "on CUDA bf16 autocast, fused AdamW and compiled decoder layers follow the recipe's "
                        "dtype/compile settings; cuda without a GPU is refused)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--json", action="store_true", help="print a JSON report per stage")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from mobilemoe.commands.common import print_json
    from mobilemoe.errors import MobileMoEError
    from mobilemoe.train.distributed import current
    from mobilemoe.train.recipe import load_recipe
    from mobilemoe.train.run import run_recipe

    if args.max_steps is not None and args.max_steps < 1:
        raise MobileMoEError(f"--max-steps must be a positive integer, got {args.max_steps}")
    recipe = load_recipe(args.recipe)
    out = args.out or f"runs/{recipe.name}"
    reports = run_recipe(recipe, out, stage=args.stage, init=args.init, resume=args.resume, force=args.force,
                         max_steps=args.max_steps, progress=not args.no_progress and not args.json,
                         device=args.device)
    if not current().is_main:
        return 0
    if args.json:
        print_json([asdict(r) for r in reports])
        return 0
    for r in reports:
        if r.skipped:
            print(f"{r.stage}: already finished -> {r.final_dir}")
            continue
        val = f", val loss {r.val_loss:.4f}" if r.val_loss is not None else ""
        loss = f"loss {r.loss_first:.4f} -> {r.loss_last:.4f}" if r.loss_first is not None else "no steps run"
        print(f"{r.stage}: {r.steps} steps, {loss}{val}, {r.tokens:,} tokens in {r.seconds:.1f}s -> {r.final_dir}")
        if r.extra.get("int4_dir"):
            print(f"  INT4 checkpoint -> {r.extra['int4_dir']}")
    return 0
