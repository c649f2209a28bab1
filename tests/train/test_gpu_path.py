"""The GPU training path, tested on CPU: activation checkpointing, FSDP2 + checkpointing on 2 gloo
processes, the once-per-step bias update across ranks, torch.compile plumbing, device flags, the
meta-device build of the paper-scale presets, one step of each paper-scale recipe on a tiny shape,
and the throughput benchmark's smoke run."""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from mobilemoe.accounting import account
from mobilemoe.cli import main as cli_main
from mobilemoe.config import preset
from mobilemoe.errors import MobileMoEError
from mobilemoe.train import TokenWindowSource, TrainConfig, Trainer, build_optimizer
from mobilemoe.train.gpu import (build_on_meta, checkpoint_layers, compile_layers, is_checkpointed, materialize,
                                 param_count, resolve_device, want_compile)
from mobilemoe.train.recipe import DataSpec, load_recipe
from mobilemoe.train.run import run_recipe

from trainutil import TEXT, micro_model, text_token_array

ROOT = Path(__file__).resolve().parents[2]
NO_CUDA = not torch.cuda.is_available()


pytestmark = pytest.mark.usefixtures("one_thread")


def _loss_and_grads(model, ids):
    out = model(ids, return_router=True)
    loss = F.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, out


# ---------------------------------------------------------------------- activation checkpointing
def test_activation_checkpointing_same_loss_grads_and_names():
    ids = torch.randint(0, 257, (2, 24), generator=torch.Generator().manual_seed(0))
    plain, ckpt = micro_model(0), micro_model(0)
    names = list(ckpt.state_dict())
    assert checkpoint_layers(ckpt.model.layers) == 2 and checkpoint_layers(ckpt.model.layers) == 0  # idempotent
    assert all(is_checkpointed(layer) for layer in ckpt.model.layers)
    assert list(ckpt.state_dict()) == names  # checkpoint tensor names unchanged
    l0, g0, o0 = _loss_and_grads(plain, ids)
    l1, g1, o1 = _loss_and_grads(ckpt, ids)
    assert torch.equal(l0, l1)
    assert g0.keys() == g1.keys() and len(g0) > 10
    for k in g0:
        assert torch.allclose(g0[k], g1[k], atol=1e-7, rtol=1e-6), k
    for a, b in zip(o0.router, o1.router):  # the balancer sees the same routing
        assert torch.equal(a.expert_ids, b.expert_ids)
    with torch.no_grad():  # evaluation skips the checkpoint machinery and gives the same logits
        assert torch.equal(plain(ids).logits, ckpt(ids).logits)


def _saved_bytes(model, ids) -> int:
    """Bytes autograd keeps for backward during one forward (what activation checkpointing cuts)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids).logits.sum().backward()
    return total


def test_activation_checkpointing_saves_less_for_backward():
    ids = torch.randint(0, 257, (2, 64), generator=torch.Generator().manual_seed(0))
    plain, ckpt = micro_model(0, num_hidden_layers=4), micro_model(0, num_hidden_layers=4)
    checkpoint_layers(ckpt.model.layers)
    full, kept = _saved_bytes(plain, ids), _saved_bytes(ckpt, ids)
    assert kept < full / 3, (kept, full)  # only each layer's input (and the head) stays alive


def test_trainer_activation_checkpointing_equals_plain():
    def run(ac: bool):
        cfg = TrainConfig(max_steps=3, lr=3e-3, warmup_steps=1, grad_accum=2, bias_update_rate=1e-2, progress=False,
                          tensorboard=False, activation_checkpointing=ac, device="cpu", dtype="bfloat16")
        src = TokenWindowSource(text_token_array(), seq_len=32, batch_size=2, seed=3)
        trainer = Trainer(micro_model(0), cfg, src)
        res = trainer.fit()
        return [h["loss"] for h in res.history], trainer.raw_model.state_dict(), trainer

    l0, s0, _ = run(False)
    l1, s1, t1 = run(True)
    assert all(is_checkpointed(layer) for layer in t1.raw_model.model.layers)
    assert l0 == l1  # bf16 autocast on CPU too: recomputation is bitwise the same forward
    for k in s0:
        assert torch.equal(s0[k], s1[k]), k


# ---------------------------------------------------------------------- FSDP2 + checkpointing, balancing
STEPS = 2


def _cfg(strategy: str, ac: bool) -> TrainConfig:
    return TrainConfig(max_steps=STEPS, lr=3e-3, warmup_steps=1, grad_accum=2, bias_update_rate=1e-2, progress=False,
                       tensorboard=False, strategy=strategy, seed=5, eps=1e-6, activation_checkpointing=ac)


def _record_balancer(trainer: Trainer, calls: list) -> list:
    """Wrap the balancer's step to record the counts it applied and the all-reduces it issued."""
    import mobilemoe.train.balance as balance

    applied = []
    real_step, real_reduce = trainer.balancer.step, balance.dist.all_reduce

    def counting_reduce(t, *a, **kw):
        calls.append(tuple(t.shape))
        return real_reduce(t, *a, **kw)

    def step():
        balance.dist.all_reduce = counting_reduce
        try:
            counts = real_step()
        finally:
            balance.dist.all_reduce = real_reduce
        applied.append(counts.clone())
        return counts

    trainer.balancer.step = step
    return applied


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        src = TokenWindowSource(text_token_array(), seq_len=32, batch_size=2, seed=3, rank=rank, world_size=world)
        trainer = Trainer(micro_model(0), _cfg("fsdp", True), src)
        calls: list = []
        applied = _record_balancer(trainer, calls)
        result = trainer.fit()
        state = trainer.model_state()
        torch.save({"losses": [h["loss"] for h in result.history], "state": state, "counts": applied,
                    "reduce_calls": calls, "checkpointed": all(is_checkpointed(m) for m in trainer.raw_model.model.layers)},
                   os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_fsdp2_with_activation_checkpointing_and_bias_update_match_single_process(tmp_path):
    init_file = tempfile.mktemp(dir=tmp_path)
    mp.spawn(_worker, args=(2, init_file, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    src = TokenWindowSource(text_token_array(), seq_len=32, batch_size=4, seed=3)  # the same global batch
    ref = Trainer(micro_model(0), _cfg("none", False), src)
    ref_applied = _record_balancer(ref, [])
    ref_losses = [h["loss"] for h in ref.fit().history]
    ref_state = ref.raw_model.state_dict()

    assert r0["checkpointed"] and r1["checkpointed"]
    assert r0["losses"] == r1["losses"] and r0["losses"] == pytest.approx(ref_losses, abs=1e-5)
    for k, v in r0["state"].items():
        assert torch.allclose(v, ref_state[k], atol=2e-5), k
    # the aux-loss-free update: ONE all-reduce of all layers' counts per optimizer step, and the summed
    # counts (so the bias update) are exactly the single process's
    assert r0["reduce_calls"] == [(2, 8)] * STEPS == r1["reduce_calls"]
    for c0, c1, c in zip(r0["counts"], r1["counts"], ref_applied, strict=True):
        assert torch.equal(c0, c1) and torch.equal(c0, c)
    for k in (k for k in ref_state if k.endswith("expert_bias")):
        assert ref_state[k].abs().sum() > 0 and torch.equal(r0["state"][k], ref_state[k]), k


# ---------------------------------------------------------------------- compile, devices, optimizer
def test_compile_layers_keeps_names_and_results():
    ids = torch.randint(0, 257, (1, 16), generator=torch.Generator().manual_seed(1))
    plain, compiled = micro_model(0), micro_model(0)
    checkpoint_layers(compiled.model.layers)
    graphs = []

    def counting_backend(gm, example_inputs):  # dynamo's capture without inductor's minutes on a CPU
        graphs.append(gm)
        return gm.forward

    assert compile_layers(compiled.model.layers, backend=counting_backend) == 2 * 4  # norms, attention, shared
    assert list(compiled.state_dict()) == list(plain.state_dict())
    l0, g0, _ = _loss_and_grads(plain, ids)
    l1, g1, _ = _loss_and_grads(compiled, ids)
    assert torch.allclose(l0, l1, atol=1e-6)
    for k in g0:
        assert torch.allclose(g0[k], g1[k], atol=1e-6), k
    assert len(graphs) >= 4  # the compiled modules really ran through dynamo
    torch._dynamo.reset()


def test_device_defaults_and_refusals(capsys):
    assert want_compile("auto", torch.device("cpu")) is False and want_compile("auto", torch.device("cuda"))
    assert want_compile(True, torch.device("cpu")) and not want_compile(False, torch.device("cuda"))
    assert resolve_device("cpu").type == "cpu"
    opt = build_optimizer(micro_model(0), TrainConfig())
    assert not opt.defaults.get("fused")  # fused AdamW only for CUDA parameters
    for bad, field in ((dict(device="tpu"), "device"), (dict(compile="yes"), "compile"),
                       (dict(compile=1), "compile"), (dict(activation_checkpointing="true"), "activation_checkpointing")):
        with pytest.raises(MobileMoEError, match=f"field '{field}'"):
            TrainConfig(**bad).validate()
    if NO_CUDA:
        with pytest.raises(MobileMoEError, match="no CUDA device is available"):
            resolve_device("cuda")
        with pytest.raises(MobileMoEError, match="no CUDA device"):
            Trainer(micro_model(0), TrainConfig(device="cuda", progress=False),
                    TokenWindowSource(text_token_array(), 16, 2))
        rc = cli_main(["train", str(ROOT / "recipes" / "tiny.yaml"), "--device", "cuda", "--out", "/nonexistent/x"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and "no CUDA device is available" in err[0]


# ---------------------------------------------------------------------- paper-scale presets and recipes
@pytest.mark.parametrize("name", ["mobilemoe-s", "mobilemoe-m", "mobilemoe-l"])
def test_meta_build_of_paper_presets(name):
    cfg = preset(name)
    model = build_on_meta(cfg)
    assert all(p.is_meta for p in model.parameters()) and all(b.is_meta for b in model.buffers())
    assert param_count(model) == account(cfg).total_params  # the accounting counts what the model holds
    assert sum(v.numel() for v in model.state_dict().values()) == account(cfg).total_params


def test_materialize_equals_a_normal_build():
    ref = micro_model(7)
    built = materialize(build_on_meta(ref.config), "cpu", seed=7)
    for k, v in ref.state_dict().items():
        assert torch.equal(v, built.state_dict()[k]), k
    assert torch.equal(ref.inv_freq, built.inv_freq)


TINY_SHAPE = dict(vocab_size=320, hidden_size=64, head_dim=16, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=32, intermediate_size_mlp=64, num_hidden_layers=2, num_local_experts=8,
                  num_experts_per_tok=2, max_position_embeddings=128)


@pytest.mark.parametrize("name", ["mobilemoe-s", "mobilemoe-m", "mobilemoe-l"])
def test_paper_recipe_one_step_on_a_tiny_shape(name, tmp_path):
    recipe = load_recipe(ROOT / "recipes" / f"{name}.yaml")
    pretrain = recipe.stage("pretrain")
    # what the GPU run uses, straight from the file: bf16, checkpointing, compile on CUDA only
    assert pretrain.dtype == "bfloat16" and pretrain.activation_checkpointing and pretrain.compile == "auto"
    assert all(s.device == "auto" for s in recipe.stages)
    text = tmp_path / "tiny.jsonl"  # ~20 documents: every 10th is held out for validation
    text.write_text("".join(json.dumps({"text": TEXT[i:i + 300]}) + "\n" for i in range(0, len(TEXT), 300)),
                    encoding="utf-8")
    recipe.model.overrides = dict(TINY_SHAPE)
    recipe.data = DataSpec(source=str(text), tokenizer="byte", val_fraction=0.1)
    pretrain.seq_len, pretrain.micro_batch_size, pretrain.grad_accum = 32, 2, 2
    pretrain.eval_steps, pretrain.checkpoint_every, pretrain.eval_every, pretrain.data = 1, 0, 0, None
    recipe.stages = [pretrain]
    reports = run_recipe(recipe, tmp_path / "out", max_steps=1, progress=False, device="cpu")
    (rep,) = reports
    assert rep.steps == 1 and rep.nan_skips == 0 and rep.tokens == 2 * 2 * 32
    assert rep.loss_first is not None and torch.isfinite(torch.tensor(rep.loss_first))
    assert rep.val_loss is not None and (Path(rep.final_dir) / "config.json").exists()


# ---------------------------------------------------------------------- the benchmark
def _bench(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_train_throughput_smoke(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("\n\n".join([TEXT] * 4), encoding="utf-8")
    bench = _bench("train_throughput")
    out = bench.main(["--smoke", "--device", "cpu", "--real-steps", "2", "--real-data", str(text),
                      "--peak-tflops", "1", "--out", str(tmp_path / "r.json")])
    assert (tmp_path / "r.json").exists()
    for role in ("moe", "dense"):
        m = out["models"][role]
        assert m["tokens_per_s_median"] > 0 and m["nan_skips"] == 0 and m["peak_memory_gib"] > 0
        assert 0 < m["mfu"] < 1 and m["train_flops_per_token"] > 0
    assert out["models"]["moe"]["active_params"] < out["models"]["moe"]["total_params"]
    real = out["real_text"]
    assert real["steps"] == 2 and real["nan_skips"] == 0 and real["expert_count_spread_first"] is not None
    if NO_CUDA:
        with pytest.raises(MobileMoEError, match="no CUDA device"):
            bench.main(["--smoke", "--device", "cuda"])
