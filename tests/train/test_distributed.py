"""Two CPU processes (gloo) train like one process with the same global batch, and stay identical."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mobilemoe.train import TokenWindowSource, TrainConfig, Trainer

from trainutil import micro_model, text_token_array

STEPS = 3


def _cfg(strategy: str) -> TrainConfig:
    return TrainConfig(max_steps=STEPS, lr=3e-3, warmup_steps=1, grad_accum=2, bias_update_rate=1e-2,
                       progress=False, strategy=strategy, seed=5, eps=1e-6)


def _worker(rank: int, world: int, init_file: str, strategy: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        def source():
            return TokenWindowSource(text_token_array(), seq_len=32, batch_size=2, seed=3, rank=rank, world_size=world)

        trainer = Trainer(micro_model(0), _cfg(strategy), source())
        result = trainer.fit()
        state = trainer.model_state()  # FSDP: the full state on rank 0, nothing elsewhere
        # stopped after step 2 and resumed from its (rank-0 written, collective) checkpoint
        ckpt_dir = os.path.join(out, "ckpt")
        cfg = _cfg(strategy)
        cfg.checkpoint_every = 2
        first = Trainer(micro_model(0), cfg, source(), out_dir=ckpt_dir).fit(stop_after=2)
        second = Trainer(micro_model(99), cfg, source(), out_dir=ckpt_dir).fit(resume=True)
        torch.save({"losses": [h["loss"] for h in result.history], "state": state,
                    "resumed_losses": [h["loss"] for h in first.history + second.history]},
                   os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _single_process():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        src = TokenWindowSource(text_token_array(), seq_len=32, batch_size=4, seed=3)  # the same global batch
        trainer = Trainer(micro_model(0), _cfg("none"), src)
        result = trainer.fit()
    finally:
        torch.set_num_threads(threads)
    return [h["loss"] for h in result.history], trainer.raw_model.state_dict()


# Adam divides by sqrt(v) + eps: for a weight whose true gradient is ~0, summation-order noise (~1e-9)
# decides the sign of a full lr-sized update with the default eps 1e-8. A larger eps keeps such
# weights still, so the comparison tests the trainer, not Adam's amplification of rounding.
def _spawn(strategy: str, tmp_path):
    init_file = tempfile.mktemp(dir=tmp_path)
    mp.spawn(_worker, args=(2, init_file, strategy, str(tmp_path)), nprocs=2, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_ddp_two_processes_match_single_process(tmp_path):
    r0, r1 = _spawn("ddp", tmp_path)
    ref_losses, ref_state = _single_process()
    assert len(r0["losses"]) == STEPS
    assert r0["losses"] == r1["losses"]  # the logged loss is the global one
    assert r0["losses"] == pytest.approx(ref_losses, abs=1e-5)
    for k, v in r0["state"].items():
        assert torch.equal(v, r1["state"][k]), f"ranks differ in {k}"
        assert torch.allclose(v, ref_state[k], atol=2e-5), f"differs from single process: {k} {(v - ref_state[k]).abs().max()} {(v - ref_state[k]).abs().gt(1e-5).sum()}"
    assert r0["resumed_losses"] == r0["losses"]  # DDP resume: bitwise
    biases = [k for k in r0["state"] if k.endswith("expert_bias")]
    assert biases and all(r0["state"][k].abs().sum() > 0 for k in biases)  # balancing ran, in sync


def test_fsdp2_two_processes_match_single_process(tmp_path):
    r0, r1 = _spawn("fsdp", tmp_path)
    ref_losses, ref_state = _single_process()
    assert r0["losses"] == r1["losses"]
    assert r0["losses"] == pytest.approx(ref_losses, abs=1e-5)
    assert r0["resumed_losses"] == r0["losses"]  # FSDP2 resume: bitwise
    assert r0["state"].keys() == ref_state.keys()
    for k, v in r0["state"].items():
        assert torch.allclose(v, ref_state[k], atol=2e-5), f"differs from single process: {k} {(v - ref_state[k]).abs().max()} {(v - ref_state[k]).abs().gt(1e-5).sum()}"
