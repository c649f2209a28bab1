"""Issue 18 for training: recipe values are checked where they enter, non-finite steps never reach
the weights, and no run loses or mixes output (lock, refusal without --resume/--force, temp-dir
cleanup, ENOSPC, a damaged checkpoint falling back, weights_only loading, strict-JSON metrics)."""

from __future__ import annotations

import copy
import errno
import json
import os

import pytest
import torch
import yaml

from mobilemoe.checkpoint import load_tensors
from mobilemoe.cli import main
from mobilemoe.errors import MobileMoEError
from mobilemoe.train import TokenWindowSource, TrainConfig, Trainer, TrainingError
from mobilemoe.train.recipe import RecipeError, load_recipe, recipe_from_dict
from mobilemoe.train.run import run_recipe
from mobilemoe.utils import OutputLocked, output_lock

from test_nan import Poisoned
from trainutil import TEXT, micro_model

MICRO = {"vocab_size": 320, "num_hidden_layers": 2, "hidden_size": 64, "head_dim": 16, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 32, "intermediate_size_mlp": 64, "num_local_experts": 8,
         "num_experts_per_tok": 2, "max_position_embeddings": 128}
STAGE = {"name": "pretrain", "seq_len": 16, "micro_batch_size": 2, "max_steps": 4, "lr": 3e-3,
         "checkpoint_every": 2, "tensorboard": False}
RECIPE = {"name": "safety", "model": {"preset": "tiny-moe", "overrides": MICRO},
          "data": {"source": "corpus.txt", "tokenizer": "byte", "val_fraction": 0.0}, "stages": [STAGE]}


def _recipe(tmp_path, **stage):
    (tmp_path / "corpus.txt").write_text(TEXT, encoding="utf-8")
    data = copy.deepcopy(RECIPE)
    data["stages"][0].update(stage)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_recipe(path)


def _records(path):
    def refuse(name):
        raise AssertionError(f"bare {name} in {path}: not JSON")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def _cfg(**kw):
    base = dict(max_steps=6, lr=3e-3, warmup_steps=2, checkpoint_every=2, progress=False, seed=7,
                bias_update_rate=1e-2, tensorboard=False)
    return TrainConfig(**{**base, **kw})


def _src(tokens):
    return TokenWindowSource(tokens, seq_len=16, batch_size=2, seed=3)


# ---------------------------------------------------------------------- values checked where they enter
@pytest.mark.parametrize("change,named,expected", [
    ({"lr": float("inf")}, "stages[0].lr", "finite"),
    ({"lr": float("nan")}, "stages[0].lr", "finite"),
    ({"betas": [0.9, 1.5]}, "stages[0].betas[1]", "[0, 1)"),
    ({"betas": [0.9]}, "stages[0].betas", "2 values"),
    ({"eps": -1e-8}, "stages[0].eps", "> 0"),
    ({"eps": 0.0}, "stages[0].eps", "> 0"),
    ({"seq_len": 1024}, "stages[0].seq_len", "max_position_embeddings 128"),
    ({"max_steps": 4.0}, "stages[0].max_steps", "integer"),
    ({"progress": 1}, "stages[0].progress", "true/false"),
    ({"decay_fraction": 1.5}, "stages[0].decay_fraction", "[0, 1]"),
    ({"save_dtype": "int8"}, "stages[0].save_dtype", "float32"),
])
def test_bad_stage_values_are_refused_naming_the_field(change, named, expected):
    data = copy.deepcopy(RECIPE)
    data["stages"][0].update(change)
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(data, source="r.yaml")
    assert f"field '{named}'" in str(err.value) and expected in str(err.value)


def test_a_typo_under_model_overrides_is_refused():
    data = copy.deepcopy(RECIPE)
    data["model"]["overrides"] = {**MICRO, "num_hiden_layers": 3}
    with pytest.raises(RecipeError, match=r"unknown field 'model.overrides.num_hiden_layers'"):
        recipe_from_dict(data)
    data["model"]["overrides"] = {**MICRO, "hidden_size": -4}  # a bad value fails at load, not mid-run
    with pytest.raises(RecipeError, match=r"field 'model'.*hidden_size"):
        recipe_from_dict(data)


def test_train_config_checks_values_too():
    for bad in ({"lr": float("inf")}, {"min_lr": float("nan")}, {"betas": (1.0, 0.95)}, {"eps": -1.0},
                {"max_steps": 2.5}):
        with pytest.raises(MobileMoEError, match="field"):
            TrainConfig(**bad).validate()


# ---------------------------------------------------------------------- non-finite steps
def test_a_step_that_makes_weights_non_finite_is_undone_and_counted(text_tokens):
    model = micro_model(0)
    trainer = Trainer(model, _cfg(max_steps=12, max_nan_skips=2), _src(text_tokens))
    step = trainer.optimizer.step
    poison = {2}  # 0-based optimizer.step calls that leave an inf weight behind
    calls = []

    def poisoned_step(*a, **kw):
        out = step(*a, **kw)
        if len(calls) in poison:
            next(model.parameters()).data[0] = float("inf")
        calls.append(1)
        return out

    trainer.optimizer.step = poisoned_step
    trainer.train_step(); trainer.train_step()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    moments = [v.clone() for s in trainer.optimizer.state.values() for v in s.values()]
    rec = trainer.train_step()
    assert rec["skipped"] and "weights became NaN/inf" in rec["skip_reason"] and trainer.nan_skips == 1
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(a, b) for a, b in
               zip(moments, [v for s in trainer.optimizer.state.values() for v in s.values()]))
    assert "skipped" not in trainer.train_step()

    poison.update(range(4, 100))  # a run that keeps producing them stops
    with pytest.raises(TrainingError, match=r"weights became NaN/inf.*max_nan_skips=2"):
        trainer.fit()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_first_step_non_finite_drops_the_new_optimizer_state(text_tokens):
    model = micro_model(0)
    trainer = Trainer(model, _cfg(max_steps=3), _src(text_tokens))
    step = trainer.optimizer.step
    trainer.optimizer.step = lambda: (step(), next(model.parameters()).data.fill_(float("nan")))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert trainer.train_step()["skipped"]
    assert not trainer.optimizer.state  # as if the step never ran
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_metrics_are_strict_json_with_null_for_nan(tmp_path, text_tokens):
    model = Poisoned(micro_model(0), bad_calls={1})
    Trainer(model, _cfg(max_steps=4, checkpoint_every=0), _src(text_tokens), out_dir=tmp_path).fit(stop_after=3)
    records = _records(tmp_path / "metrics.jsonl")  # raises on a bare NaN
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[1]["skipped"] and records[1]["loss"] is None and records[0]["loss"] > 0


# ---------------------------------------------------------------------- nothing lost
def test_rerun_into_a_finished_out_is_refused_and_force_starts_over(tmp_path, capsys):
    recipe, out = _recipe(tmp_path), tmp_path / "out"
    run_recipe(recipe, out, progress=False)
    final = (out / "pretrain" / "final" / "model.safetensors").read_bytes()
    with pytest.raises(MobileMoEError, match=r"pretrain already holds a training run; pass --resume .* --force"):
        run_recipe(recipe, out, progress=False)
    assert (out / "pretrain" / "final" / "model.safetensors").read_bytes() == final
    rc = main(["train", str(tmp_path / "recipe.yaml"), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "already holds a training run" in err
    with pytest.raises(MobileMoEError, match="at most one of --resume"):
        run_recipe(recipe, out, resume=True, force=True)

    (out / "pretrain" / "stale.txt").write_text("old run")
    run_recipe(recipe, out, progress=False, force=True)
    assert not (out / "pretrain" / "stale.txt").exists()
    assert [r["step"] for r in _records(out / "pretrain" / "metrics.jsonl")] == [1, 2, 3, 4]  # not 8 lines


def test_a_second_writer_is_refused_with_the_holders_pid(tmp_path):
    recipe, out = _recipe(tmp_path), tmp_path / "out"
    with output_lock(out, "train"):
        with pytest.raises(OutputLocked, match=rf"pid {os.getpid()} \(train\)"):
            run_recipe(recipe, out, progress=False)
    assert not (out / "pretrain").exists()  # the refused run wrote nothing
    run_recipe(recipe, out, progress=False)  # the lock died with its holder


def test_resume_without_a_checkpoint_does_not_duplicate_metrics(tmp_path):
    recipe, out = _recipe(tmp_path), tmp_path / "out"
    stage = out / "pretrain"
    stage.mkdir(parents=True)  # a run killed before its first checkpoint
    (stage / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 8.0}\n')
    run_recipe(recipe, out, resume=True, progress=False)
    records = _records(stage / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4] and records[0]["loss"] != 9.0


def test_leftover_temp_dirs_are_removed(tmp_path, text_tokens):
    for tmp in (tmp_path / "checkpoints" / ".tmp-step-0000002-x1", tmp_path / ".tmp-final-x2"):
        tmp.mkdir(parents=True)
        (tmp / "model.safetensors").write_bytes(b"\0" * 1024)
    Trainer(micro_model(0), _cfg(max_steps=2), _src(text_tokens), out_dir=tmp_path).fit()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000002"]
    assert not list(tmp_path.glob(".tmp-*"))


@pytest.mark.parametrize("target", [".tmp-step-", ".tmp-final-"])  # a checkpoint, the final model
def test_enospc_while_saving_is_one_error_and_leaves_no_temp_dir(tmp_path, monkeypatch, capsys, target):
    import mobilemoe.checkpoint as ckpt

    recipe_path = _recipe(tmp_path).source_path
    out = tmp_path / "out"
    real = ckpt.save_tensors

    def full_disk(tensors, cfg, out_dir, *a, **kw):
        if out_dir.name.startswith(target):
            (out_dir / "model.safetensors").write_bytes(b"\0" * 4096)  # the part that fit
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, cfg, out_dir, *a, **kw)

    monkeypatch.setattr(ckpt, "save_tensors", full_disk)
    for _ in range(2):  # a retry leaves nothing more behind and fails the same way
        rc = main(["train", recipe_path, "--out", str(out), "--no-progress", "--resume"])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and "No space left on device" in err
        assert str(out / "pretrain") in err and "Traceback" not in err
        assert not list((out / "pretrain").rglob(".tmp-*"))
    assert not (out / "pretrain" / "final").exists()
    monkeypatch.setattr(ckpt, "save_tensors", real)
    assert main(["train", recipe_path, "--out", str(out), "--no-progress", "--resume"]) == 0
    assert (out / "pretrain" / "final" / "train_summary.json").exists()


class _Trap:
    """Unpickling this calls os.mkdir: what a hostile train_state.pt could do with weights_only=False."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


@pytest.mark.parametrize("damage", ["truncated", "unsafe pickle"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(tmp_path, text_tokens, capsys, damage):
    full = Trainer(micro_model(0), _cfg(), _src(text_tokens), out_dir=tmp_path / "full").fit()
    Trainer(micro_model(0), _cfg(), _src(text_tokens), out_dir=tmp_path / "cut").fit(stop_after=4)
    state = tmp_path / "cut" / "checkpoints" / "step-0000004" / "train_state.pt"
    if damage == "truncated":
        state.write_bytes(state.read_bytes()[:100])
    else:  # a pickle that would run code: weights_only=True refuses it (never executed), treated as damage
        torch.save({"step": 4, "nan_skips": 0, "optimizer": {}, "data": [], "rng": [], "world_size": 1,
                    "trap": _Trap(str(tmp_path / "pwned"))}, state)
    resumed = Trainer(micro_model(5), _cfg(), _src(text_tokens), out_dir=tmp_path / "cut")
    second = resumed.fit(resume=True)
    err = capsys.readouterr().err
    assert "step-0000004" in err and "falling back to the one before it" in err
    assert [h["step"] for h in second.history][0] == 3  # continued from step-0000002
    assert [h["loss"] for h in second.history] == [h["loss"] for h in full.history][2:]
    _, a = load_tensors(tmp_path / "full" / "final")
    _, b = load_tensors(tmp_path / "cut" / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in _records(tmp_path / "cut" / "metrics.jsonl")] == list(range(1, 7))
    assert not (tmp_path / "pwned").exists()


def test_no_readable_checkpoint_is_one_clear_error(tmp_path, text_tokens):
    Trainer(micro_model(0), _cfg(), _src(text_tokens), out_dir=tmp_path).fit(stop_after=4)
    for state in (tmp_path / "checkpoints").glob("step-*/train_state.pt"):
        state.write_bytes(b"garbage")
    with pytest.raises(TrainingError, match=r"none of the 2 checkpoints .* could be read"):
        Trainer(micro_model(0), _cfg(), _src(text_tokens), out_dir=tmp_path).fit(resume=True)


def test_a_fresh_fit_into_a_directory_with_checkpoints_is_refused(tmp_path, text_tokens):
    Trainer(micro_model(0), _cfg(max_steps=2), _src(text_tokens), out_dir=tmp_path).fit()
    with pytest.raises(TrainingError, match="already holds checkpoints"):
        Trainer(micro_model(0), _cfg(max_steps=2), _src(text_tokens), out_dir=tmp_path).fit()


def test_train_state_loads_with_weights_only(tmp_path, text_tokens):
    Trainer(micro_model(0), _cfg(max_steps=2), _src(text_tokens), out_dir=tmp_path).fit()
    state = torch.load(tmp_path / "checkpoints" / "step-0000002" / "train_state.pt", weights_only=True)
    assert state["step"] == 2 and state["world_size"] == 1


def test_train_help_documents_resume_and_force(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--resume" in out and "--force" in out and "start over" in out and "locked" in out


def test_checkpoint_dirs_keep_the_umasks_permissions(tmp_path, text_tokens):
    old = os.umask(0o027)
    try:
        Trainer(micro_model(0), _cfg(max_steps=2), _src(text_tokens), out_dir=tmp_path).fit()
    finally:
        os.umask(old)
    step = tmp_path / "checkpoints" / "step-0000002"
    assert (step.stat().st_mode & 0o777, (tmp_path / "final").stat().st_mode & 0o777) == (0o750, 0o750)
    assert (step / "train_state.pt").stat().st_mode & 0o777 == 0o640
