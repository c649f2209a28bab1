"""ReMoE on a device: --device/--dtype plumbing, router-only grads and optimizer state, gradient
checkpointing equal to none, the CLI flags, and the remoe_gpu benchmark's smoke run (all on CPU)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from mobilemoe.cli import main as cli_main  # noqa: E402
from mobilemoe.errors import MobileMoEError  # noqa: E402
from mobilemoe.remoe.adapters import load_adapter  # noqa: E402
from mobilemoe.remoe.data import batches, token_array  # noqa: E402
from mobilemoe.remoe.losses import LossWeights  # noqa: E402
from mobilemoe.remoe.tiny import build_tiny  # noqa: E402
from mobilemoe.remoe.train import RemoeTrainConfig, RemoeTrainer  # noqa: E402
from mobilemoe.train.gpu import is_checkpointed  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
NO_CUDA = not torch.cuda.is_available()


@pytest.fixture
def olmoe_dir(tmp_path):
    d = tmp_path / "olmoe"
    build_tiny("olmoe", d)
    return d


def _trainer(model_dir, tmp_path, **kw):
    adapter = load_adapter(model_dir)
    cfg = RemoeTrainConfig(steps=2, lr=1e-2, warmup_steps=0, grad_accum=2, batch_size=2, seq_len=16,
                           weights=LossWeights(warm_steps=1), device="cpu", **kw)
    src = batches(token_array("random:64", None, "train", 600), 16, 2)
    return RemoeTrainer(adapter, cfg, src, None, progress=False)


@pytest.mark.parametrize("which", ["olmoe", "mobilemoe"])
def test_bf16_router_only_grads_and_optimizer_state(which, olmoe_dir, mobilemoe_dir, tmp_path):
    trainer = _trainer(olmoe_dir if which == "olmoe" else mobilemoe_dir, tmp_path, dtype="bfloat16")
    model, names = trainer.adapter.model, set(trainer.adapter.router_param_names())
    trainer.train_step()
    params = dict(model.named_parameters())
    for n, p in params.items():
        assert p.requires_grad == (n in names), n
        if n in names or n.endswith("expert_bias"):
            assert p.dtype == torch.float32, n  # fp32 master routers: bf16 would round lr-size updates away
        elif p.is_floating_point():
            assert p.dtype == torch.bfloat16, n
        assert (p.grad is None) or n in names, n
    routers = {id(params[n]) for n in names}
    assert {id(p) for p in trainer.opt.state} == routers and len(trainer.opt.state) == len(names)
    res = trainer.fit()
    assert res.frozen_identical and res.routers_changed == len(names)


@pytest.mark.parametrize("which", ["olmoe", "mobilemoe"])
def test_gradient_checkpointing_equals_plain(which, olmoe_dir, mobilemoe_dir, tmp_path):
    src_dir = olmoe_dir if which == "olmoe" else mobilemoe_dir
    plain = _trainer(src_dir, tmp_path, gradient_checkpointing=False)
    ckpt = _trainer(src_dir, tmp_path, gradient_checkpointing=True)
    assert all(is_checkpointed(layer) for layer in ckpt.adapter.decoder_layers())
    assert not any(is_checkpointed(layer) for layer in plain.adapter.decoder_layers())
    r0, r1 = plain.fit(), ckpt.fit()
    for a, b in zip(r0.history, r1.history, strict=True):
        assert a["ce"] == pytest.approx(b["ce"], abs=1e-6) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    s0, s1 = plain.adapter.router_state(), ckpt.adapter.router_state()
    for k in s0:
        assert torch.allclose(s0[k], s1[k], atol=1e-6), k


def test_cli_train_and_eval_cpu_bfloat16(olmoe_dir, tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli_main(["remoe", "train", "--model", str(olmoe_dir), "--out", str(out), "--data", "random:128",
                   "--steps", "2", "--warmup", "0", "--t-warm", "1", "--grad-accum", "1", "--batch-size", "2",
                   "--seq-len", "16", "--max-tokens", "400", "--lr", "1e-2", "--device", "cpu", "--dtype", "bfloat16",
                   "--gradient-checkpointing", "--json"])
    rep = json.loads(capsys.readouterr().out)
    assert rc == 0 and rep["frozen_identical"] and rep["routers_changed"] == 2 and rep["steps"] == 2
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["dtype"] == "bfloat16" and report["config"]["gradient_checkpointing"]
    rc = cli_main(["remoe", "eval", "--model", str(olmoe_dir), "--routers", str(out / "routers.safetensors"),
                   "--data", "random:128", "--windows", "2", "--seq-len", "16", "--device", "cpu",
                   "--dtype", "bfloat16", "--json"])
    ev = json.loads(capsys.readouterr().out)
    assert rc == 0 and ev["before"]["perplexity"] > 1 and "after" in ev and "change" in ev


@pytest.mark.skipif(not NO_CUDA, reason="a GPU is present")
def test_cuda_refused_cleanly_without_a_gpu(olmoe_dir, tmp_path, capsys):
    for action in (["train", "--out", str(tmp_path / "r"), "--steps", "1", "--max-tokens", "200", "--seq-len", "16"],
                   ["eval", "--windows", "1", "--seq-len", "16"]):
        rc = cli_main(["remoe", *action, "--model", str(olmoe_dir), "--data", "random:128", "--device", "cuda"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and "no CUDA device is available" in err[0], err


def _bench():
    spec = importlib.util.spec_from_file_location("remoe_gpu", ROOT / "benchmarks" / "remoe_gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_remoe_gpu_benchmark_smoke(capsys):
    bench = _bench()
    out = bench.main(["--smoke", "--device", "cpu", "--family", "olmoe"])
    assert out["tokens_per_s"] > 0 and out["peak_memory_gib"] > 0 and out["gradient_checkpointing"]
    # routers only: 2 layers x [8 experts, 32 hidden]; AdamW state for exactly those 2 tensors
    assert out["trainable_params"] == 2 * 8 * 32 and out["optimizer_state_params"] == 2
    assert out["total_params"] > 50 * out["trainable_params"]
    if NO_CUDA:
        with pytest.raises(MobileMoEError, match="no CUDA device"):
            bench.main(["--smoke", "--device", "cuda"])
