"""Evaluation: perplexity, multiple-choice log-likelihood tasks, MMLU, GSM8K, HumanEval, lm-eval.

Entry points::

    from mobilemoe.eval import load_eval_lm, evaluate, format_table
    lm = load_eval_lm("ckpt/")                      # config.json + safetensors + tokenizer.json
    print(format_table(evaluate(lm, "arc_easy,piqa,mmlu", options=EvalOptions(limit=100))))

* :mod:`mobilemoe.eval.lm` - :class:`EvalLM`: batched log-likelihood scoring, pluggable generation.
* :mod:`mobilemoe.eval.perplexity` - sliding-window perplexity and bits per byte.
* :mod:`mobilemoe.eval.tasks` - the task registry and the readers of the local data files.
* :mod:`mobilemoe.eval.multiple_choice` / :mod:`mobilemoe.eval.mmlu` - acc / acc_norm, few-shot.
* :mod:`mobilemoe.eval.generative` - GSM8K answer extraction, HumanEval pass@1.
* :mod:`mobilemoe.eval.sandbox` - contained execution of untrusted Python.
* :mod:`mobilemoe.eval.harness` - the ``mobilemoe`` model class for lm-evaluation-harness (imported
  on demand: it needs the optional ``lm-eval`` package).
"""

from mobilemoe.eval.generative import (
    evaluate_gsm8k,
    evaluate_humaneval,
    extract_answer,
    humaneval_program,
    is_correct,
    normalize_number,
    pass_at_k,
)
from mobilemoe.eval.lm import EvalError, EvalLM, GenerateFn, LoglikelihoodResult, load_eval_lm, reference_generate
from mobilemoe.eval.mmlu import evaluate_mmlu
from mobilemoe.eval.multiple_choice import TaskResult, evaluate_lambada, evaluate_mc, fewshot_prefix, score_items
from mobilemoe.eval.perplexity import PerplexityResult, perplexity, perplexity_file
from mobilemoe.eval.runner import EvalOptions, average, evaluate, evaluate_task, format_table, parse_tasks
from mobilemoe.eval.sandbox import SandboxResult, run_python
from mobilemoe.eval.tasks import TASKS, MCItem, TaskSpec, get_task, known_tasks, load_task_items, read_items

__all__ = [
    "TASKS", "EvalError", "EvalLM", "EvalOptions", "GenerateFn", "LoglikelihoodResult", "MCItem",
    "PerplexityResult", "SandboxResult", "TaskResult", "TaskSpec", "average", "evaluate", "evaluate_gsm8k",
    "evaluate_humaneval", "evaluate_lambada", "evaluate_mc", "evaluate_mmlu", "evaluate_task", "extract_answer",
    "fewshot_prefix", "format_table", "get_task", "humaneval_program", "is_correct", "known_tasks",
    "load_eval_lm", "load_task_items", "normalize_number", "parse_tasks", "pass_at_k", "perplexity",
    "perplexity_file", "read_items", "reference_generate", "run_python", "score_items",
]
