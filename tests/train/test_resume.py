"""A run stopped at step k and resumed from its checkpoint matches an uninterrupted run exactly."""

from __future__ import annotations

import torch

from mobilemoe.train import TokenWindowSource, TrainConfig, Trainer, TrainingError

from trainutil import micro_model

import pytest


def _cfg(**kw):
    base = dict(max_steps=6, lr=3e-3, warmup_steps=2, checkpoint_every=3, progress=False, seed=7,
                bias_update_rate=1e-2, grad_accum=2)
    base.update(kw)
    return TrainConfig(**base)


def _src(tokens):
    return TokenWindowSource(tokens, seq_len=32, batch_size=2, seed=3)


def test_resume_is_exact(tmp_path, text_tokens):
    full = Trainer(micro_model(0), _cfg(), _src(text_tokens), out_dir=tmp_path / "full").fit()

    first = Trainer(micro_model(0), _cfg(), _src(text_tokens), out_dir=tmp_path / "cut").fit(stop_after=3)
    assert first.stopped_early and first.step == 3
    assert (tmp_path / "cut" / "latest").read_text().strip() == "checkpoints/step-0000003"
    # a fresh process: different random init, the checkpoint must overwrite everything
    resumed_model = micro_model(123)
    second = Trainer(resumed_model, _cfg(), _src(text_tokens), out_dir=tmp_path / "cut").fit(resume=True)

    losses_full = [h["loss"] for h in full.history]
    losses_cut = [h["loss"] for h in first.history] + [h["loss"] for h in second.history]
    assert losses_cut == losses_full  # bitwise
    from mobilemoe.checkpoint import load_tensors

    _, a = load_tensors(tmp_path / "full" / "final")
    _, b = load_tensors(tmp_path / "cut" / "final")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the aux-free bias moved and was restored with the model
    assert any(v.abs().sum() > 0 for k, v in b.items() if k.endswith("expert_bias"))


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, text_tokens):
    with pytest.raises(TrainingError, match="no checkpoint found"):
        Trainer(micro_model(0), _cfg(), _src(text_tokens), out_dir=tmp_path).fit(resume=True)


def test_checkpoints_are_pruned(tmp_path, text_tokens):
    Trainer(micro_model(0), _cfg(checkpoint_every=1, keep_checkpoints=2), _src(text_tokens), out_dir=tmp_path).fit()
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-0000005", "step-0000006"]
