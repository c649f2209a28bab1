"""GSM8K answer extraction, pluggable greedy generation, the HumanEval sandbox."""

from __future__ import annotations

import gzip
import json
import time

import pytest
import torch

from mobilemoe.eval import (
    EvalLM,
    evaluate_gsm8k,
    evaluate_humaneval,
    extract_answer,
    humaneval_program,
    is_correct,
    normalize_number,
    pass_at_k,
    reference_generate,
    run_python,
)
from mobilemoe.eval.generative import COT_EXEMPLARS, gsm8k_prompt, read_gsm8k_problems, read_humaneval
from mobilemoe.eval.tasks import default_data_dir


@pytest.mark.parametrize("text, want", [
    ("She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18", "18"),
    ("#### 1,234", "1234"),
    ("so the total is\n####   -7", "-7"),
    ("It costs $5.00 in total.", "5"),
    ("The answer is -3.", "-3"),
    ("The answer is: $1,250.50.", "1250.5"),
    ("First 3 + 4 = 7. Then 7 * 2 = 14. The answer is 14. Next question: 99", "14"),
    ("We get 12 apples, then 0.5 of them, i.e. 6.", "6"),
    ("the result is 1,000,000.", "1000000"),
    ("The answer is 42\n\nQuestion: 17 cows", "42"),
    ("\\boxed{  256 }", "256"),
    ("There are .5 liters", "0.5"),
    ("The answer is 3.0", "3"),
    ("no numbers here", None),
    ("", None),
])
def test_extract_answer(text, want):
    assert extract_answer(text) == want


def test_normalize_and_is_correct():
    assert normalize_number("$1,234.") == "1234"
    assert normalize_number("-0.50") == "-0.5"
    assert normalize_number("abc") is None
    ref = "Janet sells 16 - 3 - 4 = 9 duck eggs.\n#### 18"
    assert is_correct("so 9 * 2 = 18. The answer is 18.", ref)
    assert is_correct("#### 18.00", ref)
    assert not is_correct("The answer is 9. Then 18 more", ref.replace("18", "17"))
    assert is_correct("...for $1,234 total", "#### 1234")
    assert not is_correct("nothing", "#### 5")


def test_gsm8k_prompts():
    assert len(COT_EXEMPLARS) == 8
    p = gsm8k_prompt("How many?", "cot")
    assert p.count("The answer is") == 8 and p.endswith("Q: How many?\nA:")
    shot = {"question": "1+1?", "answer": "1+1=2\n#### 2"}
    want = "Question: 1+1?\nAnswer: 1+1=2\n#### 2\n\nQuestion: How many?\nAnswer:"
    assert gsm8k_prompt("How many?", "plain", [shot]) == want


def scripted(tokenizer, replies):
    """A pluggable generate_fn that streams a scripted reply per call (and counts the calls)."""
    calls = []

    def generate(prompt, max_new_tokens):
        calls.append(list(prompt))
        yield from tokenizer.encode(replies[(len(calls) - 1) % len(replies)])[:max_new_tokens]

    return generate, calls


def test_gsm8k_with_pluggable_generator(tiny_lm, tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [
        {"question": "Janet has 16 eggs and eats 3. How many are left?", "answer": "16 - 3 = 13\n#### 13"},
        {"question": "What is 1,000 + 234?", "answer": "#### 1,234"},
        {"question": "What is 2 + 2?", "answer": "#### 4"}]))
    gen, calls = scripted(tiny_lm.tokenizer, [" 16 - 3 = 13. The answer is 13.\n\nQuestion: 5", " $1,234.00",
                                              " It is 5."])
    lm = EvalLM(tiny_lm.model, tiny_lm.tokenizer, generate_fn=gen)
    res = evaluate_gsm8k(lm, path, fmt="cot", return_samples=True)
    assert res.n == 3 and res.acc == pytest.approx(2 / 3) and res.shots == 8
    assert [s["prediction"] for s in res.extra["samples"]] == ["13", "1234", "5"]
    assert "Question: 5" not in res.extra["samples"][0]["output"]  # stopped at the blank line
    assert tiny_lm.tokenizer.decode(calls[0]).count("The answer is") == 8
    res = evaluate_gsm8k(lm, path, fmt="plain", shots=1, limit=1, seed=3)
    assert res.n == 1 and res.shots == 1
    assert tiny_lm.tokenizer.decode(calls[-1]).count("Question:") == 2  # one shot + the problem
    res = evaluate_gsm8k(lm, path, fmt="chat", limit=1)  # the SFT chat template, by id
    tok = tiny_lm.tokenizer
    assert calls[-1][0] == tok.bos_id and calls[-1][-1] == tok.require_id("<|assistant|>")


def test_reference_generate_matches_uncached_greedy(tiny_lm):
    prompt = [tiny_lm.prefix_token_id] + tiny_lm.encode("The quick brown fox")
    got = list(reference_generate(tiny_lm.model)(prompt, 6))
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(tiny_lm.model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert got == ids[len(prompt):]
    text = tiny_lm.generate("The quick brown fox", max_new_tokens=6, stop=[], stop_ids=[])
    assert text == tiny_lm.tokenizer.decode(got)
    first = tiny_lm.tokenizer.decode(got[:1])
    if first:  # a stop string cuts the text where it first appears
        assert tiny_lm.generate("The quick brown fox", max_new_tokens=6, stop=[first], stop_ids=[]) == ""


# ---------------------------------------------------------------------- HumanEval sandbox
@pytest.mark.sandbox
def test_sandbox_passes_and_fails():
    assert run_python("assert sum([1, 2]) == 3\n", timeout=5).passed
    res = run_python("assert 1 == 2\n", timeout=5)
    assert res.status == "failed" and "AssertionError" in res.stderr


@pytest.mark.sandbox
def test_sandbox_kills_infinite_loop():
    start = time.monotonic()
    res = run_python("while True:\n    pass\n", timeout=1.0)
    assert res.status == "timeout" and not res.passed
    assert time.monotonic() - start < 5


@pytest.mark.sandbox
def test_sandbox_contains_writes_outside_its_temp_dir(tmp_path):
    target = tmp_path / "escaped.txt"
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    attempts = [
        f"open({str(target)!r}, 'w').write('x')",
        f"import os\nfd = os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)\nos.write(fd, b'x')",
        f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')",
        f"import os\nos.symlink({str(target)!r}, 'link')\nopen('link', 'w').write('x')",
        f"import os\nos.remove({str(victim)!r})",
        f"import shutil\nshutil.copy(__file__ if '__file__' in dir() else 'program.py', {str(target)!r})",
        f"import subprocess\nsubprocess.run(['touch', {str(target)!r}])",
        f"import os\nos.system('touch {target}')",
    ]
    for code in attempts:
        res = run_python(code, timeout=5)
        assert res.status == "failed" and "PermissionError" in res.stderr, (code, res)
    assert not target.exists()
    assert victim.read_text() == "keep me"
    # writes inside the sandbox's own temp dir are fine (and vanish with it)
    ok = run_python("open('scratch.txt', 'w').write('x')\nimport tempfile\ntempfile.TemporaryFile().write(b'y')\n")
    assert ok.passed, ok.stderr


@pytest.mark.sandbox
def test_sandbox_environment_is_restricted(monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "hunter2")
    code = "import os\nassert 'SECRET_TOKEN' not in os.environ\nassert os.getcwd() == os.environ['HOME']\n"
    res = run_python(code)
    assert res.passed, res.stderr


@pytest.mark.sandbox
def test_humaneval_end_to_end_with_pluggable_generator(tiny_lm, data_dir):
    path = data_dir / "humaneval/HumanEval.jsonl.gz"
    (problem,) = read_humaneval(path)
    assert run_python(humaneval_program(problem, "    return a + b\n")).passed
    assert not run_python(humaneval_program(problem, "    return a - b\n")).passed
    gen, _ = scripted(tiny_lm.tokenizer, ["    return a + b\n\ndef extra():\n    pass\n"])
    res = evaluate_humaneval(EvalLM(tiny_lm.model, tiny_lm.tokenizer, generate_fn=gen), path, return_samples=True)
    assert res.acc == 1.0 and res.extra["samples"][0]["completion"] == "    return a + b\n"
    gen, _ = scripted(tiny_lm.tokenizer, ["    while True:\n        pass\n"])
    res = evaluate_humaneval(EvalLM(tiny_lm.model, tiny_lm.tokenizer, generate_fn=gen), path, timeout=1.0,
                             return_samples=True)
    assert res.acc == 0.0 and res.extra["samples"][0]["status"] == "timeout"
    # exiting 0 before check() runs is not a pass (the probe's false pass)
    for early in ("raise SystemExit(0)", "import os; os._exit(0)"):
        gen, _ = scripted(tiny_lm.tokenizer, ["    return a - b\n" + early + "\n"])
        res = evaluate_humaneval(EvalLM(tiny_lm.model, tiny_lm.tokenizer, generate_fn=gen), path,
                                 return_samples=True)
        assert res.acc == 0.0 and res.extra["samples"][0]["status"] == "failed", early


def test_pass_at_k():
    assert pass_at_k(10, 0, 1) == 0.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(5, 5, 2) == 1.0
    assert pass_at_k(10, 3, 2) == pytest.approx(1 - (7 * 6) / (10 * 9))


REAL = default_data_dir()


@pytest.mark.shared_data("humaneval/HumanEval.jsonl.gz")
@pytest.mark.sandbox
def test_real_humaneval_canonical_solutions_pass_in_the_sandbox():
    problems = read_humaneval(REAL / "humaneval/HumanEval.jsonl.gz", limit=12)
    with gzip.open(REAL / "humaneval/HumanEval.jsonl.gz", "rt") as fh:
        raw = [json.loads(line) for line in fh][:12]
    for p, r in zip(problems, raw):
        assert run_python(humaneval_program(p, r["canonical_solution"])).passed, p["task_id"]


@pytest.mark.shared_data("gsm8k/test.jsonl")
def test_real_gsm8k_references_match_themselves():
    for p in read_gsm8k_problems(REAL / "gsm8k/test.jsonl"):
        assert is_correct(p["answer"], p["answer"]), p["where"]
