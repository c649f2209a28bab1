"""``mobilemoe demo`` (``make run``): quick looks, resume, the closing note, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mobilemoe.cli import main
from mobilemoe.commands.demo import PROMPT, planned_steps
from mobilemoe.train.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
FAST = ["--tokens", "6", "--val-tokens", "300"]


@pytest.fixture(scope="module")
def small_recipe(tmp_path_factory) -> str:
    """recipes/tiny.yaml on 12 stdlib files (a quarter held out): the demo's real recipe shape, seconds to run."""
    data = yaml.safe_load((REPO / "recipes" / "tiny.yaml").read_text())
    data["data"].update(limit_files=12, val_fraction=0.25)
    path = tmp_path_factory.mktemp("recipe") / "small.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_planned_steps_follow_the_recipe_or_the_cap():
    recipe = load_recipe(REPO / "recipes" / "tiny.yaml")
    assert planned_steps(recipe, None) == {s.name: s.max_steps for s in recipe.stages}
    assert planned_steps(recipe, 7) == {"pretrain": 7, "midtrain": 7}


def test_quick_look_writes_its_own_out_dir(small_recipe, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--recipe", small_recipe, "--max-steps", "2", "--json", *FAST]) == 0
    data = json.loads(capsys.readouterr().out)
    # the quick look stays out of runs/demo, so it can neither block nor pose as the full run
    assert data["out"] == "runs/demo-steps-2" and data["steps"] == {"pretrain": 2, "midtrain": 2}
    assert (tmp_path / "runs" / "demo-steps-2" / "int4" / "config.json").exists()
    assert not (tmp_path / "runs" / "demo").exists()
    assert data["sample"].startswith(PROMPT) and data["sample_tokens"] == 6
    assert data["wall_seconds"] >= data["train_seconds"] > 0


def test_other_step_count_in_same_out_is_refused_then_fresh_retrains(small_recipe, tmp_path, capsys):
    out = str(tmp_path / "demo")
    assert main(["demo", "--recipe", small_recipe, "--out", out, "--max-steps", "2", "--json", *FAST]) == 0
    capsys.readouterr()
    assert main(["demo", "--recipe", small_recipe, "--out", out, "--max-steps", "3", "--json", *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "trained for 2 steps" in err and "asks for 3" in err and "--fresh" in err
    assert main(["demo", "--recipe", small_recipe, "--out", out, "--max-steps", "3", "--fresh", "--json", *FAST]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["trained"] and data["steps"] == {"pretrain": 3, "midtrain": 3}
    summary = json.loads((tmp_path / "demo" / "midtrain" / "final" / "train_summary.json").read_text())
    assert summary["step"] == 3


def test_closing_note_has_wall_time_loss_and_sample(small_recipe, tmp_path, capsys):
    out = str(tmp_path / "demo")
    args = ["demo", "--recipe", small_recipe, "--out", out, "--max-steps", "2", "--temperature", "0", *FAST]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "trained in" in text
    note = text[text.index("== done in"):].splitlines()
    assert note[0].endswith("s (wall time)")
    assert note[1].startswith("validation loss, nats/token over 300 held-out tokens: float ")
    assert "greedy" in note[2] and repr(PROMPT) in note[2]
    rule = "-" * 72
    assert note[3] == rule and note[-1] == rule
    assert "\n".join(note[4:-1]).startswith(PROMPT.rstrip())
    assert main(args) == 0  # a rerun resumes: nothing left to train, and it says so
    assert "already trained in" in capsys.readouterr().out


@pytest.mark.parametrize("flag, value, message", [
    ("--tokens", "0", "--tokens must be >= 1"),
    ("--max-steps", "0", "--max-steps must be >= 1"),
    ("--val-tokens", "1", "--val-tokens must be >= 2"),
    ("--temperature", "-1", "temperature must be a finite number >= 0"),
    ("--top-k", "-2", "top_k must be an integer >= 0"),
])
def test_bad_arguments_get_one_line(tmp_path, capsys, flag, value, message):
    assert main(["demo", "--out", str(tmp_path / "demo"), flag, value]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and err.startswith("mobilemoe demo: error:")
    assert not (tmp_path / "demo").exists()  # refused before any work
