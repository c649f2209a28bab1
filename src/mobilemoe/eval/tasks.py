"""The task registry and the readers of the local data files.

Multiple-choice tasks read the llm-foundry "Eval Gauntlet" JSON-lines schema:

* ``{"query", "choices", "gold"}``: one context, several continuations (ARC, PIQA, BoolQ, ...);
* ``{"context_options", "continuation", "gold"}``: *partial-context* scoring (WinoGrande, WSC): the
  options fill the blank in the context and the shared continuation is scored after each;
* ``{"context", "continuation"}``: LAMBADA, scored as "is the last word the greedy continuation".

Each reader turns a file into :class:`MCItem` objects (the exact strings scored) and reports a bad
line as ``file:line``. Prompts follow lm-evaluation-harness where it has the task (e.g. ARC:
``"Question: ...\\nAnswer:"`` + ``" choice"``), so numbers are comparable with published ones.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from mobilemoe.data.readers import DataError, iter_jsonl

DATA_ENV = "MOBILEMOE_DATA_DIR"


@dataclass
class MCItem:
    """One multiple-choice item as the strings that get scored.

    The model scores ``contexts[i] + continuations[i]`` for each choice ``i``; ``choice_texts[i]`` is
    the bare choice whose character length normalises ``acc_norm`` (as lm-eval does).
    """

    contexts: list[str]
    continuations: list[str]
    gold: int
    choice_texts: list[str]
    where: str = ""  # file:line

    @property
    def num_choices(self) -> int:
        return len(self.continuations)

    def as_shot(self) -> str:
        """This item solved, as a few-shot example."""
        return self.contexts[self.gold] + self.continuations[self.gold]


@dataclass
class TaskSpec:
    name: str
    kind: str  # "mc", "partial", "lambada", "mmlu", "gsm8k", "humaneval", "perplexity"
    path: str  # relative to the data directory
    description: str
    # Chance level. Multiple-choice results use the mean 1/num_choices of the items actually scored;
    # this nominal value is what `--list-tasks` shows. None for perplexity tasks.
    chance: float | None = None
    build: Callable[[dict[str, Any], str], MCItem] | None = None
    primary: str = "acc"  # what the average uses ("acc_norm" where papers report it)
    default_shots: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------- record validation
def _str(record: dict, key: str, where: str) -> str:
    if key not in record:
        raise DataError(f"{where}: missing field {key!r} (found keys: {sorted(record)})")
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def _str_list(record: dict, key: str, where: str) -> list[str]:
    if key not in record:
        raise DataError(f"{where}: missing field {key!r} (found keys: {sorted(record)})")
    value = record[key]
    if not isinstance(value, list) or len(value) < 2 or not all(isinstance(v, str) for v in value):
        raise DataError(f"{where}: field {key!r} must be a list of at least 2 strings, got {value!r:.80}")
    return value


def _gold(record: dict, n: int, where: str) -> int:
    if "gold" not in record:
        raise DataError(f"{where}: missing field 'gold' (found keys: {sorted(record)})")
    gold = record["gold"]
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < n:
        raise DataError(f"{where}: field 'gold' must be an integer in [0, {n}), got {gold!r}")
    return gold


# ---------------------------------------------------------------------- item builders
def query_choices(suffix: str = "", strip: bool = False) -> Callable[[dict, str], MCItem]:
    """``{"query", "choices", "gold"}``: context ``query + suffix``, continuations ``" " + choice``."""

    def build(record: dict, where: str) -> MCItem:
        query = _str(record, "query", where)
        choices = _str_list(record, "choices", where)
        gold = _gold(record, len(choices), where)
        ctx = (query.rstrip() if strip else query) + suffix
        return MCItem([ctx] * len(choices), [" " + c for c in choices], gold, list(choices), where)

    return build


def partial_context(record: dict, where: str) -> MCItem:
    """``{"context_options", "continuation", "gold"}``: score the shared continuation after each option."""
    options = _str_list(record, "context_options", where)
    cont = _str(record, "continuation", where)
    gold = _gold(record, len(options), where)
    return MCItem(list(options), [" " + cont] * len(options), gold, [cont] * len(options), where)


def lambada(record: dict, where: str) -> MCItem:
    """``{"context", "continuation"}``: one "choice", the target word, judged by greedy match."""
    ctx = _str(record, "context", where)
    cont = _str(record, "continuation", where)
    return MCItem([ctx], [" " + cont.strip()], 0, [cont.strip()], where)


_QA = "\nAnswer:"  # lm-eval's ARC/PIQA/BoolQ prompt suffix; the choice follows after a space

TASKS: dict[str, TaskSpec] = {t.name: t for t in [
    TaskSpec("arc_easy", "mc", "arc_easy/arc_easy.jsonl", "ARC-Easy test (4-way)",
             chance=0.25, build=query_choices(_QA), primary="acc_norm"),
    TaskSpec("arc_challenge", "mc", "arc_challenge/arc_challenge.jsonl", "ARC-Challenge test (4-way)",
             chance=0.25, build=query_choices(_QA), primary="acc_norm"),
    TaskSpec("piqa", "mc", "piqa/piqa.jsonl", "PIQA validation (2-way)",
             chance=0.5, build=query_choices(_QA, strip=True), primary="acc_norm"),
    TaskSpec("boolq", "mc", "boolq/boolq.jsonl", "BoolQ validation (yes/no)",
             chance=0.5, build=query_choices(_QA)),
    TaskSpec("openbookqa", "mc", "openbookqa/openbook_qa.jsonl", "OpenBookQA test (4-way)",
             chance=0.25, build=query_choices(), primary="acc_norm"),
    TaskSpec("siqa", "mc", "siqa/siqa.jsonl", "Social IQa validation (lettered, 2-way as staged)",
             chance=0.5, build=query_choices()),
    TaskSpec("copa", "mc", "copa/copa.jsonl", "COPA (2-way)",
             chance=0.5, build=query_choices()),
    TaskSpec("commonsense_qa", "mc", "commonsense_qa/commonsense_qa.jsonl",
             "CommonsenseQA validation (lettered, 4-way as staged)", chance=0.25, build=query_choices()),
    TaskSpec("winogrande", "partial", "winogrande/winogrande.jsonl", "WinoGrande dev, partial-context scoring",
             chance=0.5, build=partial_context),
    TaskSpec("winograd_wsc", "partial", "winograd_wsc/winograd_wsc.jsonl", "WSC273, partial-context scoring",
             chance=0.5, build=partial_context),
    TaskSpec("lambada_openai", "lambada", "lambada_openai/lambada_openai.jsonl",
             "LAMBADA (OpenAI) last-word greedy accuracy", chance=0.0, build=lambada),
    TaskSpec("mmlu", "mmlu", "mmlu", "MMLU, 57 subjects, 5-shot from dev (macro average)",
             chance=0.25, default_shots=5),
    TaskSpec("gsm8k", "gsm8k", "gsm8k/test.jsonl", "GSM8K test, exact match of the final number", chance=0.0),
    TaskSpec("humaneval", "humaneval", "humaneval/HumanEval.jsonl.gz", "HumanEval pass@1 (greedy)", chance=0.0),
    TaskSpec("wikitext2", "perplexity", "wikitext-2/test.txt", "WikiText-2 test perplexity (tokenized v1)"),
    TaskSpec("tinyshakespeare", "perplexity", "tinyshakespeare/input.txt", "Tiny Shakespeare perplexity"),
]}


def known_tasks() -> list[str]:
    return list(TASKS)


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise DataError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]


# ---------------------------------------------------------------------- data directory
def default_data_dir() -> Path:
    """``$MOBILEMOE_DATA_DIR``, else ``shared/data`` in or beside the repository checkout."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[3]
    for cand in (repo / "shared" / "data", repo.parent / "shared" / "data", Path.cwd() / "shared" / "data"):
        if cand.is_dir():
            return cand
    return repo.parent / "shared" / "data"


def task_path(spec: TaskSpec, data_dir: str | os.PathLike | None = None) -> Path:
    path = Path(data_dir or default_data_dir()) / spec.path
    if not path.exists():
        raise DataError(f"{path}: data file for task {spec.name!r} not found (set --data-dir or ${DATA_ENV} "
                        "to the folder holding the datasets)")
    return path


def read_items(spec: TaskSpec, path: str | os.PathLike, limit: int | None = None) -> list[MCItem]:
    """Read a JSON-lines task file into items (the first ``limit`` if given)."""
    if spec.build is None:
        raise DataError(f"task {spec.name!r} is not a JSON-lines multiple-choice task")
    items = []
    for lineno, record in iter_jsonl(path):
        items.append(spec.build(record, f"{path}:{lineno}"))
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise DataError(f"{path}: no items")
    return items


def load_task_items(name: str, data_dir: str | os.PathLike | None = None, limit: int | None = None) -> list[MCItem]:
    spec = get_task(name)
    return read_items(spec, task_path(spec, data_dir), limit)
