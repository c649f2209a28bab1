"""``mobilemoe eval`` on a tiny random checkpoint with --limit, and its error messages."""

from __future__ import annotations

import json

import pytest

from mobilemoe import cli


@pytest.fixture()
def run_cli(monkeypatch, capsys):
    # Only this command's module: the test must not depend on other sub-commands importing.
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["eval"])

    def run(*argv):
        rc = cli.main(["eval", *map(str, argv)])
        out, err = capsys.readouterr()
        return rc, out, err

    return run


def test_eval_is_a_registered_command():
    assert "eval" in cli.COMMAND_MODULES


def test_table_on_tiny_checkpoint(run_cli, tiny_ckpt, data_dir):
    rc, out, err = run_cli("--model", tiny_ckpt, "--tasks", "arc_easy,winogrande,lambada_openai,mmlu",
                           "--limit", 2, "--data-dir", data_dir, "--no-progress")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[1].split()[:7] == ["Task", "Metric", "Value", "±", "Stderr", "Chance", "N"]
    rows = {line.split()[0]: line.split() for line in lines[3:] if line and not line.startswith(("-", " ", "*"))}
    assert set(rows) == {"arc_easy", "winogrande", "lambada_openai", "mmlu", "Average"}
    assert rows["arc_easy"][4] == "25.00" and rows["arc_easy"][5] == "2"  # chance, N
    assert rows["winogrande"][4] == "50.00"
    assert rows["mmlu"][5] == "4" and rows["mmlu"][6] == "5"  # 2 subjects x limit 2, 5 shots
    assert "acc_norm *" in out  # ARC's average uses acc_norm


@pytest.mark.sandbox
def test_json_output(run_cli, tiny_ckpt, data_dir):
    rc, out, err = run_cli("--model", tiny_ckpt, "--tasks", "arc_easy,wikitext2,gsm8k,humaneval", "--limit", 1,
                           "--data-dir", data_dir, "--json", "--no-progress", "--window", 64,
                           "--max-new-tokens", 4, "--shots", 1)
    assert rc == 0, err
    data = json.loads(out)
    by = {t["task"]: t for t in data["tasks"]}
    assert by["arc_easy"]["n"] == 1 and by["arc_easy"]["chance"] == 0.25 and by["arc_easy"]["shots"] == 1
    assert 0.0 <= by["arc_easy"]["acc"] <= 1.0 and by["arc_easy"]["acc_norm"] is not None
    assert by["wikitext2"]["metric"] == "ppl" and by["wikitext2"]["extra"]["windows"] == 1
    assert by["wikitext2"]["extra"]["bits_per_byte"] > 0
    assert by["gsm8k"]["n"] == 1 and by["humaneval"]["n"] == 1
    avg = (by["arc_easy"]["acc_norm"] + by["gsm8k"]["acc"] + by["humaneval"]["acc"]) / 3
    assert data["average"] == pytest.approx(avg)


def test_perplexity_of_any_text_file(run_cli, tiny_ckpt, tmp_path, data_dir):
    text = tmp_path / "notes.txt"
    text.write_text("The sky is blue and the grass is green. " * 20)
    rc, out, err = run_cli("--model", tiny_ckpt, "--tasks", f"ppl:{text}", "--window", 32, "--stride", 16,
                           "--json", "--no-progress", "--data-dir", data_dir)
    assert rc == 0, err
    (task,) = json.loads(out)["tasks"]
    assert task["metric"] == "ppl" and task["extra"]["windows"] > 1 and task["extra"]["bytes"] == 800
    assert task["acc"] == pytest.approx(2.718281828 ** task["extra"]["loss"])
    rc, _, err = run_cli("--model", tiny_ckpt, "--tasks", f"ppl:{tmp_path / 'missing.txt'}")
    assert rc == 2 and "missing.txt: no such file" in err


def test_unknown_task(run_cli, tiny_ckpt, data_dir):
    rc, out, err = run_cli("--model", tiny_ckpt, "--tasks", "arc_easy,hellaswag", "--data-dir", data_dir)
    assert rc == 2 and out == ""
    assert "unknown task 'hellaswag'" in err and "known tasks:" in err and "winogrande" in err


def test_missing_data_file(run_cli, tiny_ckpt, data_dir):
    rc, _, err = run_cli("--model", tiny_ckpt, "--tasks", "piqa", "--data-dir", data_dir)
    assert rc == 2 and "piqa/piqa.jsonl" in err and "not found" in err


def test_malformed_jsonl_line(run_cli, tiny_ckpt, data_dir):
    path = data_dir / "arc_easy/arc_easy.jsonl"
    path.write_text(path.read_text() + '{"query": "Q", "choices": ["a", "b"], "gold": 0,}\n')
    rc, _, err = run_cli("--model", tiny_ckpt, "--tasks", "arc_easy", "--data-dir", data_dir, "--no-progress")
    assert rc == 2 and f"{path}:4: malformed JSON" in err


def test_bad_model_dir_and_bad_limit(run_cli, tmp_path, data_dir):
    rc, _, err = run_cli("--model", tmp_path / "nope", "--tasks", "arc_easy", "--data-dir", data_dir)
    assert rc == 2 and "not a checkpoint directory" in err
    rc, _, err = run_cli("--model", tmp_path, "--tasks", "arc_easy", "--limit", 0, "--data-dir", data_dir)
    assert rc == 2 and "--limit must be positive" in err
