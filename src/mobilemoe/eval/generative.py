"""Generative tasks: GSM8K (exact match on the final number) and HumanEval (pass@1 in a sandbox).

Generation goes through :meth:`EvalLM.generate`, i.e. the pluggable ``generate_fn`` (greedy on the
reference model with its KV cache by default; pass a faster engine's streaming generator instead).

GSM8K prompt formats:

* ``"plain"`` (default): ``Question: ...\\nAnswer:``; with ``shots > 0`` solved problems from
  ``gsm8k/train.jsonl`` (seeded choice) in the same format, their answers ending ``#### N``.
* ``"cot"``: the 8 chain-of-thought exemplars of Wei et al. (2022), ``Q: ...\\nA: ... The answer is N.``
* ``"chat"``: one user turn, no shots: the checkpoint's own ``chat_template`` when the tokenizer's directory
  has one (:func:`mobilemoe.data.chat_format.format_beside`), else the SFT template
  (:func:`mobilemoe.data.chat.encode_prompt`).
"""

from __future__ import annotations

import gzip
import json
import math
import os
import random
import re
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Sequence

from mobilemoe.data.chat import encode_prompt, gsm8k_final_answer
from mobilemoe.data.chat_format import ChatFormat, format_beside
from mobilemoe.data.readers import DataError, get_field, iter_jsonl
from mobilemoe.eval.lm import EvalLM, _progress
from mobilemoe.eval.multiple_choice import TaskResult, stderr_of_mean
from mobilemoe.eval.sandbox import require_sandbox, run_python

# ---------------------------------------------------------------------- answer extraction
# A number: optional sign and currency, digits with optional thousands commas, optional decimals.
_NUM = r"-?\$?\s?-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\$?\.\d+"
_HASH_RE = re.compile(r"####\s*(" + _NUM + ")")
_ANSWER_IS_RE = re.compile(r"answer\s+is\s*:?\s*\**\s*(" + _NUM + ")", re.IGNORECASE)
_BOXED_RE = re.compile(r"\\boxed\{\s*(" + _NUM + r")\s*\}")
_ANY_NUM_RE = re.compile(_NUM)


def normalize_number(text: str) -> str | None:
    """Canonical form of a numeric string: ``'$1,234.00'`` -> ``'1234'``, ``'-3.'`` -> ``'-3'``."""
    s = text.strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    neg = s.count("-") % 2 == 1
    s = s.replace("-", "")
    if not s:
        return None
    try:
        value = Decimal(s)
    except InvalidOperation:
        return None
    if neg:
        value = -value
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_answer(text: str) -> str | None:
    """The final numeric answer of a model's output (normalized), or None.

    Priority: the last ``#### N``; else the last ``the answer is N``; else the last ``\\boxed{N}``;
    else the last number in the text.
    """
    for regex in (_HASH_RE, _ANSWER_IS_RE, _BOXED_RE):
        found = regex.findall(text)
        if found:
            return normalize_number(found[-1])
    found = _ANY_NUM_RE.findall(text)
    return normalize_number(found[-1]) if found else None


def is_correct(prediction: str, reference_answer: str) -> bool:
    """Exact match of the normalized final numbers (reference: a GSM8K answer with ``#### N``)."""
    ref = gsm8k_final_answer(reference_answer)
    ref = normalize_number(ref) if ref is not None else extract_answer(reference_answer)
    pred = extract_answer(prediction)
    return pred is not None and pred == ref


# ---------------------------------------------------------------------- GSM8K
COT_EXEMPLARS: list[tuple[str, str]] = [
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, "
     "there will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have "
     "been 21 - 15 = 6. The answer is 6."),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5."),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, "
     "they had 74 - 35 = 39. The answer is 39."),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did "
     "Jason give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8. "
     "The answer is 8."),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 = 9. "
     "The answer is 9."),
    ("There were nine computers in the server room. Five more computers were installed each day, from monday to "
     "thursday. How many computers are now in the server room?",
     "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 computers "
     "were added. 9 + 20 is 29. The answer is 29."),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf "
     "balls did he have at the end of wednesday?",
     "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, "
     "he had 35 - 2 = 33 golf balls. The answer is 33."),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars "
     "left. 23 - 15 is 8. The answer is 8."),
]

GSM8K_FORMATS = ("plain", "cot", "chat")


def read_gsm8k_problems(path: str | os.PathLike, limit: int | None = None) -> list[dict]:
    """``[{"question", "answer", "where"}]`` from a GSM8K JSON-lines file."""
    out = []
    for lineno, record in iter_jsonl(path):
        where = f"{path}:{lineno}"
        q, a = get_field(record, "question", where), get_field(record, "answer", where)
        if not isinstance(q, str) or not isinstance(a, str):
            raise DataError(f"{where}: 'question' and 'answer' must be strings")
        out.append({"question": q, "answer": a, "where": where})
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise DataError(f"{path}: no problems")
    return out


def gsm8k_prompt(question: str, fmt: str = "plain", shots: Sequence[dict] = ()) -> str:
    if fmt == "cot":
        body = "".join(f"Q: {q}\nA: {a}\n\n" for q, a in COT_EXEMPLARS)
        return body + f"Q: {question}\nA:"
    body = "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in shots)
    return body + f"Question: {question}\nAnswer:"


def _chat_prompt(lm: EvalLM, chat: ChatFormat | None, question: str) -> list[int]:
    """One user turn, in the checkpoint's chat_template when it has one, else the SFT template."""
    turn = [{"role": "user", "content": question}]
    return chat.prompt_ids(turn) if chat is not None else encode_prompt(lm.tokenizer, turn)


def evaluate_gsm8k(lm: EvalLM, path: str | os.PathLike, *, limit: int | None = None, fmt: str = "plain",
                   shots: int = 0, train_path: str | os.PathLike | None = None, seed: int = 1234,
                   max_new_tokens: int = 256, name: str = "gsm8k", return_samples: bool = False) -> TaskResult:
    """Exact-match accuracy on GSM8K (see the module docstring for the prompt formats)."""
    if fmt not in GSM8K_FORMATS:
        raise DataError(f"unknown GSM8K format {fmt!r}; choose one of {GSM8K_FORMATS}")
    problems = read_gsm8k_problems(path, limit)
    pool: list[dict] = []
    if fmt == "plain" and shots > 0:
        pool = read_gsm8k_problems(train_path) if train_path and Path(train_path).exists() else \
            read_gsm8k_problems(path)
    stop = ["Question:", "\n\n"] if fmt == "plain" else ["Q:", "\n\n"] if fmt == "cot" else []
    chat = format_beside(lm.tokenizer) if fmt == "chat" else None
    stop_ids = chat.stop_ids if chat is not None else None  # None: the EvalLM's defaults
    correct, samples = [], []
    bar = _progress(len(problems), name, lm.progress)
    for i, p in enumerate(problems):
        if fmt == "chat":
            prompt = _chat_prompt(lm, chat, p["question"])
        else:
            rng = random.Random(f"{seed}:{i}")
            cands = [s for s in pool if s["question"] != p["question"]]
            chosen = rng.sample(cands, min(shots, len(cands))) if shots > 0 else []
            prompt = gsm8k_prompt(p["question"], fmt, chosen)
        out = lm.generate(prompt, max_new_tokens=max_new_tokens, stop=stop, stop_ids=stop_ids)
        ok = is_correct(out, p["answer"])
        correct.append(float(ok))
        if return_samples:
            samples.append({"where": p["where"], "output": out, "prediction": extract_answer(out),
                            "reference": gsm8k_final_answer(p["answer"]), "correct": ok})
        bar.update(1)
    bar.close()
    extra = {"format": fmt}
    if return_samples:
        extra["samples"] = samples
    return TaskResult(task=name, n=len(correct), acc=sum(correct) / len(correct), acc_stderr=stderr_of_mean(correct),
                      chance=0.0, shots=8 if fmt == "cot" else (shots if fmt == "plain" else 0), extra=extra)


# ---------------------------------------------------------------------- HumanEval
HUMANEVAL_STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
_HE_FIELDS = ("task_id", "prompt", "entry_point", "test")


def read_humaneval(path: str | os.PathLike, limit: int | None = None) -> list[dict]:
    """Problems of ``HumanEval.jsonl(.gz)``; a malformed line is reported as ``file:line``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    opener = gzip.open if path.suffix == ".gz" else open
    out = []
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno})") from None
                if not isinstance(record, dict):
                    raise DataError(f"{where}: expected a JSON object")
                for f in _HE_FIELDS:
                    if not isinstance(get_field(record, f, where), str):
                        raise DataError(f"{where}: field {f!r} must be a string")
                out.append({**{f: record[f] for f in _HE_FIELDS}, "where": where})
                if limit is not None and len(out) >= limit:
                    break
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: unreadable ({exc})") from None
    if not out:
        raise DataError(f"{path}: no problems")
    return out


def humaneval_program(problem: dict, completion: str) -> str:
    """The program that passes iff the completion is correct: prompt + completion + tests + check."""
    return (problem["prompt"] + completion + "\n\n" + problem["test"] + "\n\n"
            + f"check({problem['entry_point']})\n")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimator (Chen et al. 2021) from n samples with c correct."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def evaluate_humaneval(lm: EvalLM, path: str | os.PathLike, *, limit: int | None = None, max_new_tokens: int = 384,
                       timeout: float = 10.0, name: str = "humaneval", return_samples: bool = False) -> TaskResult:
    """pass@1 with greedy decoding; each program runs in :func:`~mobilemoe.eval.sandbox.run_python`.

    A program passes only if ``check(entry_point)`` returned (the sandbox's pass marker), so a
    completion that exits early, e.g. ``raise SystemExit(0)``, fails. Refuses (``SandboxUnavailable``)
    before generating anything when no working ``bwrap`` is installed.
    """
    require_sandbox()
    problems = read_humaneval(path, limit)
    passed, samples = [], []
    bar = _progress(len(problems), name, lm.progress)
    for p in problems:
        completion = lm.generate(p["prompt"], max_new_tokens=max_new_tokens, stop=HUMANEVAL_STOP)
        res = run_python(humaneval_program(p, completion), timeout=timeout)
        passed.append(float(res.passed))
        if return_samples:
            samples.append({"task_id": p["task_id"], "completion": completion, "status": res.status,
                            **({"output_truncated": True} if res.truncated else {})})
        bar.update(1)
    bar.close()
    extra = {"samples": samples} if return_samples else {}
    return TaskResult(task=name, n=len(passed), acc=sum(passed) / len(passed), acc_stderr=stderr_of_mean(passed),
                      chance=0.0, extra=extra)
