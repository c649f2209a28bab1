"""Run a list of tasks on one model and format the results as a paper-style table."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from mobilemoe.data.readers import DataError
from mobilemoe.eval.generative import evaluate_gsm8k, evaluate_humaneval
from mobilemoe.eval.lm import EvalLM, _progress
from mobilemoe.eval.mmlu import evaluate_mmlu
from mobilemoe.eval.multiple_choice import TaskResult, evaluate_lambada, evaluate_mc
from mobilemoe.eval.perplexity import perplexity_file
from mobilemoe.eval.sandbox import require_sandbox
from mobilemoe.eval.tasks import default_data_dir, get_task, read_items, task_path


@dataclass
class EvalOptions:
    limit: int | None = None  # items per task (per subject for MMLU; windows for perplexity)
    shots: int | None = None  # None: each task's default (MMLU 5, others 0)
    seed: int = 1234
    gsm8k_format: str = "plain"
    max_new_tokens: int | None = None
    window: int | None = None  # perplexity window (default: the model's max length)
    stride: int | None = None  # perplexity stride (default: the window)
    timeout: float = 10.0  # HumanEval per-program timeout


PPL_PREFIX = "ppl:"  # "ppl:PATH" = perplexity of any UTF-8 text file


def parse_tasks(text: str | Sequence[str]) -> list[str]:
    """``"arc_easy,piqa,ppl:notes.txt"`` -> validated names (an unknown name lists the known ones)."""
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    if not names:
        raise DataError("no tasks given")
    for name in names:
        if not name.startswith(PPL_PREFIX):
            get_task(name)
    return list(dict.fromkeys(names))


def check_data(names: Sequence[str], data_dir: str | os.PathLike | None = None) -> None:
    """Fail fast (before loading a model) when a task's data file is missing, or HumanEval has no sandbox."""
    for name in names:
        if name.startswith(PPL_PREFIX):
            if not Path(name[len(PPL_PREFIX):]).is_file():
                raise DataError(f"{name[len(PPL_PREFIX):]}: no such file (task {name!r})")
        else:
            task_path(get_task(name), data_dir)
            if get_task(name).kind == "humaneval":
                require_sandbox()  # never run model-written code unconfined


def _perplexity_result(lm: EvalLM, name: str, path: str | os.PathLike, opt: EvalOptions) -> TaskResult:
    ppl = perplexity_file(lm, path, window=opt.window, stride=opt.stride, max_windows=opt.limit)
    return TaskResult(task=name, n=ppl.tokens, acc=ppl.ppl, acc_stderr=None, chance=None, metric="ppl",
                      extra=ppl.to_dict())


def evaluate_task(lm: EvalLM, name: str, data_dir: str | os.PathLike | None = None,
                  options: EvalOptions | None = None) -> TaskResult:
    opt = options or EvalOptions()
    if name.startswith(PPL_PREFIX):
        return _perplexity_result(lm, name, name[len(PPL_PREFIX):], opt)
    spec = get_task(name)
    path = task_path(spec, data_dir)
    shots = spec.default_shots if opt.shots is None else opt.shots
    if spec.kind in ("mc", "partial"):
        pool = read_items(spec, path)
        res = evaluate_mc(lm, name, pool, limit=opt.limit, shots=shots, seed=opt.seed,
                          use_norm=spec.kind == "mc")  # chance from the items scored
    elif spec.kind == "lambada":
        res = evaluate_lambada(lm, name, read_items(spec, path), limit=opt.limit, shots=shots, seed=opt.seed)
    elif spec.kind == "mmlu":
        res = evaluate_mmlu(lm, path, shots=shots, limit=opt.limit, name=name)
    elif spec.kind == "gsm8k":
        res = evaluate_gsm8k(lm, path, limit=opt.limit, fmt=opt.gsm8k_format, shots=shots,
                             train_path=path.parent / "train.jsonl", seed=opt.seed,
                             max_new_tokens=opt.max_new_tokens or 256, name=name)
    elif spec.kind == "humaneval":
        res = evaluate_humaneval(lm, path, limit=opt.limit, max_new_tokens=opt.max_new_tokens or 384,
                                 timeout=opt.timeout, name=name)
    elif spec.kind == "perplexity":
        res = _perplexity_result(lm, name, path, opt)
    else:  # pragma: no cover - registry and dispatch are edited together
        raise DataError(f"task {name!r}: unsupported kind {spec.kind!r}")
    res.primary = spec.primary if res.acc_norm is not None else "acc"
    return res


def evaluate(lm: EvalLM, tasks: str | Sequence[str], data_dir: str | os.PathLike | None = None,
             options: EvalOptions | None = None) -> list[TaskResult]:
    """Evaluate ``lm`` on each task (data files are checked first)."""
    names = parse_tasks(tasks)
    data_dir = data_dir or default_data_dir()
    check_data(names, data_dir)
    results = []
    bar = _progress(len(names), "tasks", lm.progress and len(names) > 1)
    for name in names:
        bar.set_postfix_str(name)
        results.append(evaluate_task(lm, name, data_dir, options))
        bar.update(1)
    bar.close()
    return results


def average(results: Sequence[TaskResult]) -> float | None:
    """Mean of each accuracy task's primary metric (perplexity tasks excluded)."""
    vals = [r.primary_value for r in results if r.metric == "acc"]
    return sum(vals) / len(vals) if vals else None


def _num(x: float) -> str:
    return f"{x:.3f}" if abs(x) < 1e6 else f"{x:.3e}"


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def format_table(results: Sequence[TaskResult]) -> str:
    """Paper-style table: accuracies in %, ``±`` one standard error, chance level, items, shots."""
    header = ("Task", "Metric", "Value", "± Stderr", "Chance", "N", "Shots")
    rows = []
    for r in results:
        if r.metric == "ppl":
            rows.append((r.task, "ppl", _num(r.acc), "", "-", str(r.n), "0"))
            rows.append(("", "bits/byte", f"{r.extra['bits_per_byte']:.4f}", "", "-", "", ""))
            continue
        mark = lambda m: m + (" *" if r.primary == m and r.acc_norm is not None else "")  # noqa: E731
        rows.append((r.task, mark("acc"), _pct(r.acc), _pct(r.acc_stderr), _pct(r.chance), str(r.n), str(r.shots)))
        if r.acc_norm is not None:
            rows.append(("", mark("acc_norm"), _pct(r.acc_norm), _pct(r.acc_norm_stderr), _pct(r.chance), "", ""))
        if "micro_acc" in r.extra:
            rows.append(("", "micro acc", _pct(r.extra["micro_acc"]), _pct(r.extra["micro_acc_stderr"]),
                         _pct(r.chance), "", ""))
        if "ppl" in r.extra:
            rows.append(("", "ppl", _num(r.extra["ppl"]), "", "-", "", ""))
    avg = average(results)
    acc_tasks = [r for r in results if r.metric == "acc"]
    if avg is not None:
        chance = [r.chance for r in acc_tasks if r.chance is not None]
        rows.append(("Average", "acc", _pct(avg), "", _pct(sum(chance) / len(chance)) if chance else "-",
                     str(len(acc_tasks)) + " tasks", ""))
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    right = {2, 3, 4, 5, 6}

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [line(header), line(["-" * w for w in widths])]
    for row in rows:
        if row[0] == "Average":
            out.append(line(["-" * w for w in widths]))
        out.append(line(row))
    if any(r.acc_norm is not None for r in results):
        out.append("* = the metric the average uses (acc_norm: log-likelihood / choice length in characters)")
    return "\n".join(out).rstrip()
