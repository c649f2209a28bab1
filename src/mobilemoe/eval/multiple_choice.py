"""Multiple-choice scoring by log-likelihood: acc, acc_norm, few-shot prompts, standard errors.

For each item every choice ``i`` is scored as ``log p(continuations[i] | shots + contexts[i])``.

* ``acc``: the argmax of the raw log-likelihoods is the gold choice.
* ``acc_norm``: the argmax of log-likelihood divided by the choice's length in *characters* (what
  lm-evaluation-harness calls ``acc_norm``), which removes the bias against long choices.

Few-shot: ``k`` solved examples drawn from the same pool (never the item itself) with a generator
seeded by ``(seed, item index)``, so a run is reproducible and independent of ``limit``/batching.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from typing import Sequence

from mobilemoe.eval.lm import EvalLM
from mobilemoe.eval.tasks import MCItem

SHOT_SEPARATOR = "\n\n"


@dataclass
class TaskResult:
    """One task's numbers. ``acc_norm`` is None where it does not apply (same continuation per choice)."""

    task: str
    n: int  # items (tokens for perplexity)
    acc: float  # the value of `metric` (accuracy in [0, 1] unless metric says otherwise)
    acc_stderr: float | None
    chance: float | None
    acc_norm: float | None = None
    acc_norm_stderr: float | None = None
    shots: int = 0
    metric: str = "acc"  # "acc" for accuracy tasks, "ppl" for perplexity tasks
    primary: str = "acc"  # the number the average uses: "acc" or "acc_norm"
    extra: dict = field(default_factory=dict)  # e.g. LAMBADA perplexity, MMLU per-subject accuracies

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def primary_value(self) -> float:
        return self.acc_norm if self.primary == "acc_norm" and self.acc_norm is not None else self.acc


def stderr_of_mean(values: Sequence[float]) -> float:
    """Sample standard error of a mean (lm-eval's ``mean_stderr``): sqrt(var_{n-1} / n)."""
    n = len(values)
    if n < 2:
        return 0.0
    mu = sum(values) / n
    var = sum((v - mu) ** 2 for v in values) / (n - 1)
    return math.sqrt(var / n)


def fewshot_prefix(pool: Sequence[MCItem], index: int, k: int, seed: int) -> str:
    """``k`` solved examples from ``pool`` (excluding ``pool[index]``), each followed by a blank line."""
    if k <= 0:
        return ""
    rng = random.Random(f"{seed}:{index}")
    candidates = [j for j in range(len(pool)) if j != index]
    picks = rng.sample(candidates, min(k, len(candidates)))
    return "".join(pool[j].as_shot() + SHOT_SEPARATOR for j in picks)


@dataclass
class ItemScore:
    logprobs: list[float]
    is_greedy: list[bool]
    gold: int
    pred: int
    pred_norm: int


def score_items(lm: EvalLM, items: Sequence[MCItem], prefixes: Sequence[str] | None = None,
                desc: str = "scoring") -> list[ItemScore]:
    """Log-likelihood of every choice of every item, batched across items."""
    prefixes = prefixes if prefixes is not None else [""] * len(items)
    requests, owners = [], []
    for i, (item, prefix) in enumerate(zip(items, prefixes)):
        for ctx, cont in zip(item.contexts, item.continuations):
            requests.append((prefix + ctx, cont))
            owners.append(i)
    results = lm.loglikelihood(requests, desc=desc)
    per_item: list[list] = [[] for _ in items]
    for owner, res in zip(owners, results):
        per_item[owner].append(res)
    scores = []
    for item, res in zip(items, per_item):
        lps = [r.logprob for r in res]
        norm = [lp / max(len(t), 1) for lp, t in zip(lps, item.choice_texts)]
        scores.append(ItemScore(lps, [r.is_greedy for r in res], item.gold,
                                max(range(len(lps)), key=lps.__getitem__),
                                max(range(len(norm)), key=norm.__getitem__)))
    return scores


def evaluate_mc(lm: EvalLM, name: str, pool: Sequence[MCItem], *, limit: int | None = None, shots: int = 0,
                seed: int = 1234, use_norm: bool = True, chance: float | None = None) -> TaskResult:
    """Score the first ``limit`` items of ``pool`` (shots come from the whole pool)."""
    items = list(pool[:limit] if limit else pool)
    prefixes = [fewshot_prefix(pool, i, shots, seed) for i in range(len(items))]
    scores = score_items(lm, items, prefixes, desc=name)
    accs = [float(s.pred == s.gold) for s in scores]
    result = TaskResult(task=name, n=len(items), acc=sum(accs) / len(accs), acc_stderr=stderr_of_mean(accs),
                        chance=chance if chance is not None else sum(1 / it.num_choices for it in items) / len(items),
                        shots=shots)
    if use_norm:
        norms = [float(s.pred_norm == s.gold) for s in scores]
        result.acc_norm, result.acc_norm_stderr = sum(norms) / len(norms), stderr_of_mean(norms)
    return result


def evaluate_lambada(lm: EvalLM, name: str, pool: Sequence[MCItem], *, limit: int | None = None, shots: int = 0,
                     seed: int = 1234) -> TaskResult:
    """Last-word accuracy: the target word's tokens are all the greedy prediction. Also reports ppl."""
    items = list(pool[:limit] if limit else pool)
    prefixes = [fewshot_prefix(pool, i, shots, seed) for i in range(len(items))]
    scores = score_items(lm, items, prefixes, desc=name)
    accs = [float(s.is_greedy[0]) for s in scores]
    mean_lp = sum(s.logprobs[0] for s in scores) / len(scores)
    return TaskResult(task=name, n=len(items), acc=sum(accs) / len(accs), acc_stderr=stderr_of_mean(accs),
                      chance=0.0, shots=shots, extra={"ppl": math.exp(min(-mean_lp, 700.0))})
