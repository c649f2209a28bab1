"""Trainer details: bf16 autocast, gradient accumulation bookkeeping, metrics log, config checks."""

from __future__ import annotations

import json

import pytest
import torch

from mobilemoe.errors import MobileMoEError
from mobilemoe.train import TokenWindowSource, TrainConfig, Trainer

from trainutil import micro_model


def _src(tokens, batch=2):
    return TokenWindowSource(tokens, seq_len=32, batch_size=batch, seed=1)


def test_bf16_autocast_trains(text_tokens):
    fp32 = Trainer(micro_model(0), TrainConfig(max_steps=3, lr=1e-3, progress=False), _src(text_tokens)).fit()
    bf16 = Trainer(micro_model(0), TrainConfig(max_steps=3, lr=1e-3, progress=False, dtype="bfloat16"),
                   _src(text_tokens)).fit()
    a, b = [h["loss"] for h in fp32.history], [h["loss"] for h in bf16.history]
    assert all(torch.isfinite(torch.tensor(b)))
    assert b == pytest.approx(a, abs=0.05)


def test_grad_accum_counts_tokens_and_lr(text_tokens, tmp_path):
    cfg = TrainConfig(max_steps=4, lr=1e-3, warmup_steps=2, grad_accum=3, progress=False, eval_every=2,
                      tensorboard=False)
    val = TokenWindowSource(text_tokens, seq_len=32, batch_size=2, seed=9)
    result = Trainer(micro_model(0), cfg, _src(text_tokens), val, out_dir=tmp_path).fit()
    assert [h["tokens"] for h in result.history] == [3 * 2 * 32] * 4
    assert [h["lr"] for h in result.history][:2] == pytest.approx([5e-4, 1e-3])
    assert [e["step"] for e in result.evals] == [2, 4]
    assert result.evals[0]["val_ppl"] == pytest.approx(torch.tensor(result.evals[0]["val_loss"]).exp().item())
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sum("val_loss" in l for l in lines) == 2 and sum("loss" in l for l in lines) == 4
    assert (tmp_path / "final" / "model.safetensors").exists()


def test_eval_is_repeatable(text_tokens):
    val = TokenWindowSource(text_tokens, seq_len=32, batch_size=2, seed=9)
    trainer = Trainer(micro_model(0), TrainConfig(max_steps=1, progress=False), _src(text_tokens), val)
    assert trainer.evaluate() == trainer.evaluate()


@pytest.mark.parametrize("field,value", [("schedule", "step"), ("dtype", "fp8"), ("grad_accum", 0), ("lr", -1.0)])
def test_bad_train_config_names_field(field, value, text_tokens):
    with pytest.raises(MobileMoEError, match=f"'{field}'"):
        Trainer(micro_model(0), TrainConfig(**{field: value}), _src(text_tokens))


class _ListSource:
    """Fixed batches in order (state = index)."""

    def __init__(self, batches):
        self.batches, self.i = batches, 0

    def next_batch(self):
        b = self.batches[self.i % len(self.batches)]
        self.i += 1
        return b

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, s):
        self.i = s["i"]


def test_grad_accum_equals_one_big_batch_with_masks(text_tokens):
    """Loss = token-weighted mean over the whole step, also when micro-batches have uneven masks."""
    src = TokenWindowSource(text_tokens, seq_len=32, batch_size=4, seed=2)
    full = [src.next_batch() for _ in range(3)]
    for x, y in full:
        y[0, :20] = -100  # the first half of each batch loses more targets than the second
        y[3, :3] = -100
    halves = [(x[i:i + 2], y[i:i + 2]) for x, y in full for i in (0, 2)]
    cfg = dict(max_steps=3, lr=1e-3, progress=False, eps=1e-6, bias_update_rate=1e-2)
    a = Trainer(micro_model(0), TrainConfig(**cfg), _ListSource(full)).fit()
    m = micro_model(0)
    b = Trainer(m, TrainConfig(grad_accum=2, **cfg), _ListSource(halves)).fit()
    assert [h["loss"] for h in b.history] == pytest.approx([h["loss"] for h in a.history], abs=1e-6)
    assert [h["tokens"] for h in b.history] == [h["tokens"] for h in a.history]
