"""A NaN/inf loss skips the step (no update), is counted, and stops training after a limit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mobilemoe.train import TokenWindowSource, TrainConfig, Trainer, TrainingError

from trainutil import micro_model


class Poisoned(nn.Module):
    """Delegates to a model but returns NaN logits on the chosen forward calls (0-based)."""

    def __init__(self, model, bad_calls):
        super().__init__()
        self.inner, self.config, self.bad, self.calls = model, model.config, set(bad_calls), 0

    def forward(self, x, **kw):
        out = self.inner(x, **kw)
        if self.calls in self.bad:
            out.logits = out.logits * float("nan")
        self.calls += 1
        return out


def test_nan_step_is_skipped_and_counted(text_tokens):
    model = Poisoned(micro_model(0), bad_calls={2})
    src = TokenWindowSource(text_tokens, seq_len=16, batch_size=2, seed=0)
    trainer = Trainer(model, TrainConfig(max_steps=5, lr=1e-2, progress=False, max_nan_skips=3), src)
    before = {}

    def snapshot():
        return {k: v.clone() for k, v in model.state_dict().items()}

    trainer.train_step(); trainer.train_step()
    before = snapshot()
    rec = trainer.train_step()  # third forward call -> NaN
    assert rec["skipped"] and rec["nan_skips"] == 1
    after = snapshot()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no update, bias untouched
    assert all(p.grad is None for p in model.parameters())
    rec = trainer.train_step()
    assert "skipped" not in rec and torch.isfinite(torch.tensor(rec["loss"]))
    assert trainer.nan_skips == 1


def test_too_many_nan_steps_raise(text_tokens):
    model = Poisoned(micro_model(0), bad_calls=set(range(100)))
    src = TokenWindowSource(text_tokens, seq_len=16, batch_size=2, seed=0)
    trainer = Trainer(model, TrainConfig(max_steps=50, progress=False, max_nan_skips=2), src)
    with pytest.raises(TrainingError, match=r"NaN/inf.*max_nan_skips=2"):
        trainer.fit()
    assert trainer.nan_skips == 3 and trainer.step == 3
