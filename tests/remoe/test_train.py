"""Router-only training on a MobileMoE checkpoint: only router tensors change; deltas, resume, CLI."""

import json

import pytest
import torch
from safetensors.torch import load_file

from mobilemoe.cli import main
from mobilemoe.errors import MobileMoEError
from mobilemoe.remoe.adapters import load_adapter
from mobilemoe.remoe.data import batches, token_array
from mobilemoe.remoe.losses import LossWeights
from mobilemoe.remoe.train import RemoeTrainConfig, RemoeTrainer, load_delta, save_delta


def _cfg(**kw):
    base = dict(steps=3, lr=5e-2, warmup_steps=1, grad_accum=2, batch_size=2, seq_len=24,
                weights=LossWeights(warm_steps=2))
    base.update(kw)
    return RemoeTrainConfig(**base)


def test_only_router_tensors_change(mobilemoe_dir, tmp_path):
    a = load_adapter(mobilemoe_dir)
    assert a.family == "mobilemoe" and a.scoring == "sigmoid" and a.num_layers == 3
    before = {k: v.clone() for k, v in a.model.state_dict().items()}
    res = RemoeTrainer(a, _cfg(), batches(token_array("random:64", None, "train", 1000), 24, 2),
                       tmp_path / "run", progress=False).fit()
    assert res.frozen_identical and res.routers_changed == 3 and res.steps == 3
    routers = set(a.router_param_names())
    for k, v in a.model.state_dict().items():
        assert torch.equal(before[k], v) == (k not in routers), k
    # the router-only gradient path: nothing but routers requires grad
    assert {n for n, p in a.model.named_parameters() if p.requires_grad} == routers
    rec = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rec] == [1, 2, 3] and rec[0]["alpha"] == 0.0 and rec[-1]["alpha"] == 1.0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["frozen_identical"] is True


def test_selected_experts_follow_module_rule(mobilemoe_dir):
    a = load_adapter(mobilemoe_dir)
    fwd = a.forward(torch.randint(0, 64, (1, 10)))
    for i, lr in enumerate(fwd.layers):
        assert torch.equal(a.select(i, lr.logits.detach()[0]), lr.expert_ids[0])
        assert torch.allclose(lr.logits, lr.ref_logits)


def test_checkpoint_resume_matches_straight_run(mobilemoe_dir, tmp_path):
    toks = token_array("random:64", None, "train", 1000)
    a = load_adapter(mobilemoe_dir)
    RemoeTrainer(a, _cfg(steps=4), batches(toks, 24, 2), tmp_path / "full", progress=False).fit()
    b = load_adapter(mobilemoe_dir)
    RemoeTrainer(b, _cfg(steps=2, checkpoint_every=2), batches(toks, 24, 2), tmp_path / "part", progress=False).fit()
    assert (tmp_path / "part" / "checkpoints" / "step-2" / "COMPLETE").exists()
    c = load_adapter(mobilemoe_dir)
    t = RemoeTrainer(c, _cfg(steps=4), batches(toks, 24, 2), tmp_path / "part", progress=False)
    t.fit(resume=True)
    assert t.step == 4
    for k, v in a.router_state().items():
        assert torch.allclose(v, c.router_state()[k], atol=1e-6), k


def test_delta_validation(mobilemoe_dir, tmp_path):
    a = load_adapter(mobilemoe_dir)
    state = a.router_state()
    p = save_delta(state, tmp_path / "d.safetensors", {"family": "mobilemoe"})
    s2, meta = load_delta(p)
    assert meta["format"] == "mobilemoe-remoe-routers" and set(s2) == set(state)
    bad = dict(state)
    bad.pop(next(iter(bad)))
    with pytest.raises(MobileMoEError, match="missing"):
        a.load_router_state(bad)
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(MobileMoEError, match="not a ReMoE router delta"):
        load_delta(tmp_path / "other.safetensors")


def test_cli_train_eval_apply(mobilemoe_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(["remoe", "train", "--model", str(mobilemoe_dir), "--out", str(out), "--data", "random",
               "--steps", "2", "--lr", "0.05", "--warmup", "0", "--grad-accum", "1", "--batch-size", "2",
               "--seq-len", "16", "--t-warm", "1", "--max-tokens", "400", "--json"])
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["frozen_identical"] and rep["routers_changed"] == 3
    delta = out / "routers.safetensors"
    assert main(["remoe", "apply", "--model", str(mobilemoe_dir), "--routers", str(delta),
                 "--out", str(tmp_path / "applied")]) == 0
    capsys.readouterr()
    base = load_file(str(mobilemoe_dir / "model.safetensors"))
    new = load_file(str(tmp_path / "applied" / "model.safetensors"))
    d, _ = load_delta(delta)
    assert set(base) == set(new)
    for k in base:
        if k in d:
            assert torch.equal(new[k], d[k]) and not torch.equal(new[k], base[k])
        else:
            assert new[k].dtype == base[k].dtype and torch.equal(new[k], base[k]), k
    rc = main(["remoe", "eval", "--model", str(mobilemoe_dir), "--compare", str(tmp_path / "applied"),
               "--data", "random", "--seq-len", "16", "--windows", "2", "--capacity", "3", "--json",
               "--trace-out", str(tmp_path / "t.npz")])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res) == {"before", "after", "change"} and res["before"]["capacity"] == 3
    assert 0 <= res["change"]["eor_after"] <= 1 and res["before"]["perplexity"] > 1
    assert (tmp_path / "t.npz").exists() and (tmp_path / "t_after.npz").exists()
    assert main(["remoe", "eval", "--model", str(tmp_path / "nope")]) == 2


def test_remoe_eval_measures_offloaded_tpot(mobilemoe_dir, tmp_path, capsys):
    """--measure-tpot decodes with the experts offloaded; the counters are those of a real cache."""
    from mobilemoe.runtime import native

    if not native.is_available():
        pytest.skip("native kernels not built")
    rc = main(["remoe", "eval", "--model", str(mobilemoe_dir), "--data", "random", "--seq-len", "16",
               "--windows", "2", "--capacity", "3", "--measure-tpot", "--tpot-tokens", "5", "--tpot-prompts", "2",
               "--tpot-dir", str(tmp_path / "tp"), "--json"])
    assert rc == 0
    mt = json.loads(capsys.readouterr().out)["before"]["measured_tpot"]
    off = mt["offloaded"]
    assert mt["capacity"] == 3 and off["tpot_ms"] > 0 and mt["in_ram"]["tpot_ms"] > 0
    assert 0 <= off["hit_rate"] <= 1 and off["misses_per_token"] <= 2 * 3  # at most K=2 experts x 3 layers
    assert (tmp_path / "tp" / "before" / "expert-store" / "experts.bin").exists()
