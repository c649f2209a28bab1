"""``mobilemoe eval``: benchmark a checkpoint on local tasks and print a paper-style table."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="evaluate a checkpoint: zero/few-shot accuracy, MMLU, GSM8K, HumanEval, perplexity",
        description="Evaluate a checkpoint directory (config.json + safetensors + tokenizer.json; float or "
                    "INT4) on local benchmark files and print each task's accuracy with its standard error "
                    "and chance level, and the average. `--list-tasks` shows the known tasks.")
    p.add_argument("--list-tasks", action="store_true", help="list the known tasks with their chance levels")
    p.add_argument("--model", help="checkpoint directory")
    p.add_argument("--tasks",
                   help="comma-separated task names; ppl:PATH = perplexity and bits/byte of any text file")
    p.add_argument("--limit", type=int, default=None,
                   help="first N items per task (per subject for MMLU; N windows for perplexity tasks)")
    p.add_argument("--shots", type=int, default=None, help="few-shot examples (default: MMLU 5, others 0)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the few-shot example choice")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward when scoring")
    p.add_argument("--max-length", type=int, default=None, help="context tokens (default: the model's)")
    p.add_argument("--data-dir", default=None, help="datasets folder (default: $MOBILEMOE_DATA_DIR or shared/data)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the one in --model)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="compute dtype (default: float32)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    p.add_argument("--gsm8k-format", choices=("plain", "cot", "chat"), default="plain",
                   help="GSM8K prompt: plain Q/A, the 8-shot chain-of-thought exemplars, or the chat template")
    p.add_argument("--max-new-tokens", type=int, default=None, help="generation budget (GSM8K 256, HumanEval 384)")
    p.add_argument("--window", type=int, default=None, help="perplexity window in tokens")
    p.add_argument("--stride", type=int, default=None, help="perplexity stride in tokens (default: the window)")
    p.add_argument("--timeout", type=float, default=10.0, help="HumanEval seconds per program")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mobilemoe.commands.common import print_json
    from mobilemoe.eval.lm import EvalError, load_eval_lm
    from mobilemoe.eval.runner import EvalOptions, average, check_data, evaluate, format_table, parse_tasks
    from mobilemoe.eval.tasks import default_data_dir

    if args.list_tasks:
        from mobilemoe.eval.tasks import TASKS

        width = max(map(len, TASKS))
        for name, spec in TASKS.items():
            chance = "-" if spec.chance is None else f"{100 * spec.chance:.0f}%"
            print(f"{name:<{width}}  chance {chance:>8}  {spec.description}  [{spec.path}]")
        print(f"{'ppl:PATH':<{width}}  chance {'-':>8}  perplexity and bits/byte of any UTF-8 text file")
        return 0
    if not args.model or not args.tasks:
        raise EvalError("give --model CHECKPOINT_DIR and --tasks NAME[,NAME...] (or --list-tasks)")
    for flag in ("limit", "shots", "batch_size", "max_length", "max_new_tokens", "window", "stride"):
        value = getattr(args, flag)
        if value is not None and value < (0 if flag == "shots" else 1):
            raise EvalError(f"--{flag.replace('_', '-')} must be positive, got {value}")
    names = parse_tasks(args.tasks)
    data_dir = args.data_dir or default_data_dir()
    check_data(names, data_dir)  # before the (slow) model load

    import torch

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, None: None}[args.dtype]
    lm = load_eval_lm(args.model, batch_size=args.batch_size, max_length=args.max_length, dtype=dtype,
                      tokenizer=args.tokenizer, device=args.device, progress=not args.no_progress)
    options = EvalOptions(limit=args.limit, shots=args.shots, seed=args.seed, gsm8k_format=args.gsm8k_format,
                          max_new_tokens=args.max_new_tokens, window=args.window, stride=args.stride,
                          timeout=args.timeout)
    results = evaluate(lm, names, data_dir, options)
    if args.json:
        print_json({"model": str(args.model), "tasks": [r.to_dict() for r in results],
                    "average": average(results), "options": vars(options)})
    else:
        print(f"{args.model}: {len(names)} task(s)" + (f", limit {args.limit}" if args.limit else ""))
        print(format_table(results))
    return 0
