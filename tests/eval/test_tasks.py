"""Task registry and readers: local llm-foundry jsonl files, MMLU CSVs, clear data errors."""

from __future__ import annotations

import pytest

import json

from mobilemoe.data.readers import DataError
from mobilemoe.eval import TASKS, evaluate_mmlu, get_task, load_task_items, read_items
from mobilemoe.eval.mmlu import format_question, mmlu_items, read_mmlu_csv, subjects

ARC = [{"query": "Question: What color is the sky?", "choices": ["blue", "green"], "gold": 0},
       {"query": "Question: Two plus two?", "choices": ["three", "four"], "gold": 1}]


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


EXPECTED_CHANCE = {"arc_easy": 0.25, "arc_challenge": 0.25, "piqa": 0.5, "boolq": 0.5, "openbookqa": 0.25,
                   "siqa": 0.5, "copa": 0.5, "commonsense_qa": 0.25, "winogrande": 0.5, "winograd_wsc": 0.5}


def test_unknown_task_lists_known_ones():
    with pytest.raises(DataError) as exc:
        get_task("hellaswagg")
    assert "hellaswagg" in str(exc.value) and "arc_easy" in str(exc.value) and "mmlu" in str(exc.value)


def test_missing_data_file(tmp_path):
    with pytest.raises(DataError, match=r"arc_easy\.jsonl.*not found"):
        load_task_items("arc_easy", data_dir=tmp_path)


@pytest.mark.parametrize("line, message", [
    ('{"query": "Q", "choices": ["a", "b"], "gold": 0', "malformed JSON"),
    ('{"query": "Q", "choices": ["a", "b"]}', "missing field 'gold'"),
    ('{"query": "Q", "choices": ["a", "b"], "gold": 5}', "'gold' must be an integer in"),
    ('{"query": "Q", "choices": "ab", "gold": 0}', "list of at least 2 strings"),
    ('["not", "an", "object"]', "expected a JSON object"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "arc_easy/arc_easy.jsonl", [ARC[0], "", line, ARC[1]])
    with pytest.raises(DataError) as exc:
        load_task_items("arc_easy", data_dir=tmp_path)
    assert f"{path}:3" in str(exc.value) and message in str(exc.value)


def test_item_formats(data_dir):
    arc = load_task_items("arc_easy", data_dir)
    assert arc[0].contexts[0] == "Question: What color is the sky?\nAnswer:"
    assert arc[0].continuations == [" blue", " green", " red", " a big yellow"]
    assert arc[0].choice_texts[3] == "a big yellow" and arc[0].where.endswith("arc_easy.jsonl:1")
    wino = load_task_items("winogrande", data_dir)
    assert wino[0].contexts[0] != wino[0].contexts[1]
    assert wino[0].continuations == [" got the harder cases."] * 2
    lam = load_task_items("lambada_openai", data_dir, limit=1)
    assert len(lam) == 1 and lam[0].continuations == [" dog"]


@pytest.mark.parametrize("name", [n for n, t in TASKS.items() if t.build is not None])
def test_real_files_parse(name, shared_data):
    spec = TASKS[name]
    items = load_task_items(name, shared_data(spec.path), limit=50)
    assert len(items) == 50
    for it in items:
        assert 0 <= it.gold < it.num_choices and all(c.startswith(" ") for c in it.continuations)
    if name in EXPECTED_CHANCE:
        assert sum(1 / it.num_choices for it in items) / len(items) == pytest.approx(EXPECTED_CHANCE[name])
    if name.startswith("arc") or name in ("piqa", "boolq"):
        assert items[0].contexts[0].endswith("\nAnswer:") and "\n\nAnswer" not in items[0].contexts[0]
    assert spec.kind in ("mc", "partial", "lambada")


def test_real_mmlu_layout(shared_data):
    mmlu = shared_data("mmlu") / "mmlu"
    names = subjects(mmlu)
    assert len(names) == 57 and "abstract_algebra" in names
    items, prefixes = mmlu_items(mmlu, "anatomy", shots=5, limit=2)
    assert prefixes[0].startswith("The following are multiple choice questions (with answers) about anatomy.\n\n")
    assert prefixes[0].count("\nAnswer: ") == 5
    assert items[0].continuations == [" A", " B", " C", " D"] and items[0].contexts[0].endswith("\nAnswer:")


def test_mmlu_reader_and_prompt(data_dir):
    rows = read_mmlu_csv(data_dir / "mmlu/test/astronomy_test.csv")
    assert rows[0]["question"] == "astronomy q0, with comma?" and rows[0]["answer"] == 0
    assert format_question(rows[1]) == "astronomy q1, with comma?\nA. a\nB. b\nC. c\nD. d\nAnswer:"
    bad = data_dir / "mmlu/test/bad_test.csv"
    bad.write_text("question,choice0,choice1,choice2,choice3,answer\nq,a,b,c,d,0\nq,a,b,c,d,E\n")
    with pytest.raises(DataError, match=rf"{bad}:3: 'answer' must be an integer 0-3"):
        read_mmlu_csv(bad)


def test_mmlu_macro_and_micro(tiny_lm, data_dir):
    (data_dir / "mmlu/test/astronomy_test.csv").write_text(
        "question,choice0,choice1,choice2,choice3,answer\n" + "".join(f"q{i},a,b,c,d,{i % 4}\n" for i in range(5)))
    res = evaluate_mmlu(tiny_lm, data_dir / "mmlu", shots=1)
    per = res.extra["per_subject"]
    assert set(per) == {"astronomy", "virology"} and res.n == 8 and res.chance == 0.25
    assert res.acc == pytest.approx((per["astronomy"] + per["virology"]) / 2)
    assert res.extra["micro_acc"] == pytest.approx((per["astronomy"] * 5 + per["virology"] * 3) / 8)
    only = evaluate_mmlu(tiny_lm, data_dir / "mmlu", shots=0, limit=2, only=["virology"])
    assert only.n == 2 and only.extra["subjects"] == 1
    with pytest.raises(DataError, match="unknown MMLU subject"):
        evaluate_mmlu(tiny_lm, data_dir / "mmlu", only=["astrology"])


def test_read_items_limit(data_dir):
    spec = get_task("arc_easy")
    assert len(read_items(spec, data_dir / spec.path, limit=2)) == 2
