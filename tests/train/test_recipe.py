"""Recipe schema: shipped recipes load; bad/unknown fields are rejected naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mobilemoe.cli import main
from mobilemoe.train.recipe import RecipeError, load_recipe, recipe_from_dict

RECIPES = Path(__file__).resolve().parents[2] / "recipes"

BASE = {
    "name": "t",
    "model": {"preset": "tiny-moe"},
    "data": {"source": "corpus.txt", "tokenizer": "byte"},
    "stages": [{"name": "pretrain", "seq_len": 32, "micro_batch_size": 2, "max_steps": 3, "lr": "3e-3"}],
}


def _with(path: str, value):
    import copy

    data = copy.deepcopy(BASE)
    node = data
    keys = path.split(".")
    for k in keys[:-1]:
        node = node[int(k)] if isinstance(node, list) else node[k]
    node[keys[-1]] = value
    return data


@pytest.mark.parametrize("name", ["tiny", "mobilemoe-s", "mobilemoe-m", "mobilemoe-l"])
def test_shipped_recipes_load(name):
    recipe = load_recipe(RECIPES / f"{name}.yaml")
    assert recipe.stages
    if name != "tiny":
        stages = {s.name: s for s in recipe.stages}
        assert list(stages) == ["pretrain", "midtrain", "sft", "qat"]
        assert (stages["pretrain"].seq_len, stages["pretrain"].lr, stages["pretrain"].schedule) == (2048, 4e-4, "cosine")
        assert (stages["midtrain"].seq_len, stages["midtrain"].lr, stages["midtrain"].schedule) == (8192, 4e-5, "linear")
        assert (stages["sft"].seq_len, stages["sft"].lr, stages["sft"].loss_on) == (8192, 4e-6, "answers")
        assert (stages["qat"].lr, stages["qat"].qat_group_size) == (4e-6, 32)
        assert all(s.tokens == "unknown" for s in recipe.stages)


def test_yaml_exponent_without_dot_is_a_float():
    assert recipe_from_dict(BASE).stages[0].lr == 3e-3


@pytest.mark.parametrize("path,value,named", [
    ("learning_rate", 1.0, "learning_rate"),
    ("stages.0.lr_peak", 1.0, "stages[0].lr_peak"),
    ("model.layers", 3, "model.layers"),
    ("data.sorce", "x", "data.sorce"),
    ("stages.0.max_steps", "ten", "stages[0].max_steps"),
    ("stages.0.lr", "fast", "stages[0].lr"),
    ("stages.0.schedule", "step", "stages[0].schedule"),
    ("stages.0.name", "finetune", "stages[0].name"),
    ("stages.0.loss_on", "answers", "stages[0].loss_on"),
    ("stages.0.betas", [0.9], "stages[0].betas"),
    ("stages.0.qat_group_size", 64, "stages[0].qat_group_size"),
    ("stages.0.grad_accum", 0, "stages[0].grad_accum"),
    ("data.format", "csv", "data.format"),
    ("seed", "zero", "seed"),
])
def test_bad_field_is_named(path, value, named):
    import re

    with pytest.raises(RecipeError, match=re.escape(f"'{named}'")):
        recipe_from_dict(_with(path, value))


def test_missing_length_and_model():
    with pytest.raises(RecipeError, match=r"stages\[0\]\.max_steps"):
        recipe_from_dict(_with("stages.0.max_steps", None))
    ok = recipe_from_dict(_with("stages.0.max_steps", None) | {"stages": [
        {"name": "pretrain", "seq_len": 32, "micro_batch_size": 2, "tokens": 640}]})
    assert ok.stages[0].max_steps is None and ok.stages[0].tokens == 640
    with pytest.raises(RecipeError, match="model"):
        recipe_from_dict(_with("model", {"preset": "tiny-moe", "config": "x.json"}))


def test_cli_reports_bad_field(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_with("stages.0.warmup", 10)))
    assert main(["train", str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "stages[0].warmup" in err and "bad.yaml" in err


def test_qat_unavailable_is_clear(monkeypatch):
    import sys

    from mobilemoe.errors import MobileMoEError
    from mobilemoe.train.run import _apply_qat

    monkeypatch.setitem(sys.modules, "mobilemoe.quant.qat", None)  # import now raises ImportError
    stage = recipe_from_dict(_with("stages.0.name", "qat")).stages[0]
    with pytest.raises(MobileMoEError, match="QAT not available"):
        _apply_qat(object(), stage)
