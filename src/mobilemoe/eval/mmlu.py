"""MMLU from the local CSVs: ``mmlu/{dev,test}/<subject>_{dev,test}.csv``.

The staged files have a header ``question,choice0,choice1,choice2,choice3,answer`` with the answer as
a 0-based index. The prompt is lm-evaluation-harness's: a subject line, ``k`` solved dev questions
(the first ``k`` of the subject's dev split, as in the original paper), then the question; the four
continuations are ``" A"`` .. ``" D"``. Reported: the macro average over subjects (``acc``) and the
micro average over questions (``extra["micro_acc"]``), plus every subject's accuracy.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Sequence

from mobilemoe.data.readers import DataError
from mobilemoe.eval.lm import EvalLM
from mobilemoe.eval.multiple_choice import TaskResult, score_items, stderr_of_mean
from mobilemoe.eval.tasks import MCItem

LETTERS = ("A", "B", "C", "D")
COLUMNS = ("question", "choice0", "choice1", "choice2", "choice3", "answer")


def read_mmlu_csv(path: str | os.PathLike) -> list[dict]:
    """Rows ``{"question", "choices", "answer"}`` of one MMLU CSV; bad rows name ``file:line``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    rows = []
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or tuple(reader.fieldnames) != COLUMNS:
            raise DataError(f"{path}:1: expected the header {','.join(COLUMNS)}, got {reader.fieldnames}")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if None in row or any(row[c] is None for c in COLUMNS):
                raise DataError(f"{where}: expected {len(COLUMNS)} columns")
            try:
                answer = int(row["answer"])
            except ValueError:
                raise DataError(f"{where}: 'answer' must be an integer 0-3, got {row['answer']!r}") from None
            if not 0 <= answer < 4:
                raise DataError(f"{where}: 'answer' must be an integer 0-3, got {answer}")
            rows.append({"question": row["question"], "choices": [row[f"choice{i}"] for i in range(4)],
                         "answer": answer, "where": where})
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def subjects(root: str | os.PathLike) -> list[str]:
    root = Path(root)
    test = root / "test"
    if not test.is_dir():
        raise DataError(f"{test}: MMLU test folder not found")
    names = sorted(p.name.removesuffix("_test.csv") for p in test.glob("*_test.csv"))
    if not names:
        raise DataError(f"{test}: no *_test.csv files")
    return names


def format_question(row: dict) -> str:
    lines = [row["question"].strip()] + [f"{L}. {c}" for L, c in zip(LETTERS, row["choices"])]
    return "\n".join(lines) + "\nAnswer:"


def subject_header(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def mmlu_items(root: str | os.PathLike, subject: str, shots: int = 5,
               limit: int | None = None) -> tuple[list[MCItem], list[str]]:
    """(items, prompt prefixes) of one subject."""
    root = Path(root)
    test = read_mmlu_csv(root / "test" / f"{subject}_test.csv")
    if limit:
        test = test[:limit]
    prefix = subject_header(subject)
    if shots > 0:
        dev = read_mmlu_csv(root / "dev" / f"{subject}_dev.csv")
        prefix += "".join(f"{format_question(r)} {LETTERS[r['answer']]}\n\n" for r in dev[:shots])
    items = [MCItem([format_question(r)] * 4, [f" {L}" for L in LETTERS], r["answer"], list(LETTERS), r["where"])
             for r in test]
    return items, [prefix] * len(items)


def evaluate_mmlu(lm: EvalLM, root: str | os.PathLike, *, shots: int = 5, limit: int | None = None,
                  only: Sequence[str] | None = None, name: str = "mmlu") -> TaskResult:
    """Macro/micro MMLU accuracy; ``limit`` applies per subject, ``only`` restricts the subjects."""
    names = subjects(root)
    if only:
        unknown = sorted(set(only) - set(names))
        if unknown:
            raise DataError(f"unknown MMLU subject(s) {unknown}; known: {', '.join(names)}")
        names = [n for n in names if n in set(only)]
    all_items, all_prefixes, owner = [], [], []
    for subject in names:
        items, prefixes = mmlu_items(root, subject, shots, limit)
        all_items += items
        all_prefixes += prefixes
        owner += [subject] * len(items)
    scores = score_items(lm, all_items, all_prefixes, desc=name)
    per: dict[str, list[float]] = {s: [] for s in names}
    for subject, s in zip(owner, scores):
        per[subject].append(float(s.pred == s.gold))
    subj_acc = {s: sum(v) / len(v) for s, v in per.items()}
    macro = sum(subj_acc.values()) / len(subj_acc)
    macro_se = math.sqrt(sum(stderr_of_mean(v) ** 2 for v in per.values())) / len(per)
    flat = [a for v in per.values() for a in v]
    return TaskResult(task=name, n=len(flat), acc=macro, acc_stderr=macro_se, chance=0.25, shots=shots,
                      extra={"micro_acc": sum(flat) / len(flat), "micro_acc_stderr": stderr_of_mean(flat),
                             "subjects": len(names), "per_subject": subj_acc})
