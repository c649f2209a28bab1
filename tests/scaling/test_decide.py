"""`mobilemoe decide`: the three product decisions and this machine's measured profile."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mobilemoe.cli import main
from mobilemoe.config import preset
from mobilemoe.scaling import decide as D
from mobilemoe.scaling.profiles import get_profile, load_profile

ROOT = Path(__file__).resolve().parents[2]
ANDROID_6GB = ROOT / "examples" / "profiles" / "midrange-android-6gb.yaml"
FEATURES = ROOT / "examples" / "brief_features.yaml"


def _bench_json(tmp_path, tpot_s=(0.05, 0.06), ttft_s=(0.4, 1.6)) -> Path:
    """A minimal `mobilemoe bench --json` report of mobilemoe-s at contexts 256 and 1024."""
    rep = {"bench_config": {"moe": "mobilemoe-s"}, "machine": {"cpu": "test cpu"}}
    for c, tp, tt in zip((256, 1024), tpot_s, ttft_s):
        rep[f"moe_ttft_s_{c}"] = tt
        rep[f"moe_decode_tok_s_{c}"] = 1 / tp
    p = tmp_path / "bench.json"
    p.write_text(json.dumps(rep))
    return p


# ---------------------------------------------------------------------- decision 1
def test_tier_brief_examples():
    """6 GB Android leaving 4 GB at 8K context: S is the ceiling; 12 GB flagship: L fits."""
    phone = D.tier_decision(load_profile(ANDROID_6GB), 4.0, context=8192)
    assert phone["recommended"] == "mobilemoe-s"
    assert [r["fits"] for r in phone["tiers"]] == [True, False, False]
    flagship = D.tier_decision(get_profile("galaxy-s25"), 4.0, context=8192)
    assert flagship["recommended"] == "mobilemoe-l"
    assert all(r["decode_source"] == "projected" for r in flagship["tiers"])
    # resident memory counts the KV cache at the context
    s = flagship["tiers"][0]
    assert s["memory_gib"] == pytest.approx(s["int4_gib"] + s["kv_cache_gib"])
    assert "mobilemoe-l" in flagship["verdict"]


def test_tier_context_beyond_window_does_not_fit():
    res = D.tier_decision(get_profile("galaxy-s25"), 1.0, context=20000)
    assert res["recommended"] is None and "no released tier fits" in res["verdict"]


def test_tier_uses_measured_speeds(tmp_path):
    dev = get_profile("galaxy-s25")
    m = D.load_measured(_bench_json(tmp_path))
    res = D.tier_decision(dev, 4.0, context=640, prompt=256, measured=m)
    s, mm = res["tiers"][0], res["tiers"][1]
    assert s["decode_source"] == "measured" and s["ttft_source"] == "measured"
    assert 1 / s["decode_tok_s"] == pytest.approx(0.055)  # halfway between 256 and 1024
    assert s["ttft_s"] == pytest.approx(0.4)
    # other tiers: roofline x the measured/roofline ratio of S on the same device
    ratio = 0.055 / D.roofline_tpot_s(preset("mobilemoe-s"), dev, 640)
    assert mm["decode_source"] == "calibrated"
    assert 1 / mm["decode_tok_s"] == pytest.approx(D.roofline_tpot_s(preset("mobilemoe-m"), dev, 640) * ratio)


def test_interp_extends_linearly():
    pts = [(256, 1.0), (1024, 2.0)]
    assert D._interp(pts, 640) == pytest.approx(1.5)
    assert D._interp(pts, 1792) == pytest.approx(3.0)
    assert D._interp([(256, 1.0)], 5000) == 1.0


def test_bad_measured_file(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"foo": 1}))
    with pytest.raises(D.DecideError, match="not a `mobilemoe bench --json` report"):
        D.load_measured(bad)


# ---------------------------------------------------------------------- decision 2
def test_features_brief_example():
    feats = D.load_features(FEATURES)
    res = D.feature_decisions(get_profile("galaxy-s25"), "mobilemoe-l", feats)
    by = {r["feature"]: r for r in res["features"]}
    summ = by["full-document summarisation"]
    assert summ["verdict"] == "cloud" and any(w.startswith("context") for w in summ["why"])
    assert by["memory across sessions"]["verdict"] == "cloud"
    assert any(r["verdict"] == "on-device" for r in res["features"])
    for r in res["features"]:  # the full reply is the prefill plus one decode step per reply token
        assert r["reply_s"] == pytest.approx(r["ttft_s"] + r["reply_tokens"] / r["decode_tok_s"])
        late = (r["max_reply_s"] and r["reply_s"] > r["max_reply_s"]) or (r["max_ttft_s"] and r["ttft_s"] > r["max_ttft_s"])
        assert bool(late) == any(w.startswith("latency") for w in r["why"])


def test_features_smaller_tier_is_faster():
    feats = D.parse_features({"features": [{"name": "x", "prompt_tokens": 128, "reply_tokens": 32, "max_reply_s": 0.6}]})
    dev = get_profile("galaxy-s25")
    s = D.feature_decisions(dev, "mobilemoe-s", feats)["features"][0]
    l = D.feature_decisions(dev, "mobilemoe-l", feats)["features"][0]
    assert s["reply_s"] < l["reply_s"]
    assert s["verdict"] == "on-device" and l["verdict"] == "cloud"
    # a cached prefix widens the window: same prefill, slower decode, more KV cache
    long = D.parse_features({"features": [{"name": "x", "prompt_tokens": 128, "reply_tokens": 32,
                                           "context_tokens": 8000, "max_reply_s": 0.6}]})
    s2 = D.feature_decisions(dev, "mobilemoe-s", long)["features"][0]
    assert s2["ttft_s"] == pytest.approx(s["ttft_s"])
    assert s2["decode_tok_s"] < s["decode_tok_s"] and s2["resident_gib"] > s["resident_gib"]


@pytest.mark.parametrize("rec, msg", [
    ({"name": "x", "prompt_tokens": 10, "reply_tokens": 5}, "give a latency budget"),
    ({"name": "x", "prompt_tokens": 10, "reply_tokens": 5, "max_ttft_s": 1, "colour": 1}, "unknown"),
    ({"name": "x", "prompt_tokens": -3, "reply_tokens": 5, "max_ttft_s": 1}, "positive integer"),
    ({"name": "x", "reply_tokens": 5, "max_ttft_s": 1}, "prompt_tokens': missing"),
])
def test_features_bad_input(rec, msg):
    with pytest.raises(D.DecideError, match=msg):
        D.parse_features({"features": [rec]})


def test_cli_errors_are_one_line(tmp_path, capsys):
    f = tmp_path / "f.yaml"
    f.write_text("features: [{name: a, prompt_tokens: 1, reply_tokens: 1}]\n")
    assert main(["decide", "features", "--device", "galaxy-s25", "--tier", "mobilemoe-s", "--features", str(f)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mobilemoe decide: error:") and "latency budget" in err and "\n" not in err
    assert main(["decide", "tier", "--device", "galaxy-s25", "--leave-gb", "13"]) == 2
    assert "leaves nothing" in capsys.readouterr().err


def test_cli_tier_and_features_print_verdicts(capsys):
    assert main(["decide", "tier", "--device", str(ANDROID_6GB), "--leave-gb", "4", "--context", "8192"]) == 0
    out = capsys.readouterr().out
    assert "verdict: ship mobilemoe-s" in out and "projected" in out
    assert main(["decide", "features", "--device", "galaxy-s25", "--tier", "mobilemoe-l", "--features",
                 str(FEATURES), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tier"] == "mobilemoe-l"


# ---------------------------------------------------------------------- decision 3
def _trace(ids: np.ndarray):
    from mobilemoe.remoe.traces import Trace

    return Trace(ids, np.array([0]), np.zeros(ids.shape[1], np.uint8), {})


def test_decode_miss_profile_matches_eor_bound():
    """C = K with LRU: misses per token = K (1 - EOR) (Proposition 3.1), skipping the first token."""
    from mobilemoe.remoe.cache_sim import eor

    rng = np.random.default_rng(0)
    ids = np.stack([np.stack([rng.choice(8, 2, replace=False) for _ in range(200)])])
    mask = np.r_[False, np.ones(199, bool)]
    means, probs = D.decode_miss_profile(ids, 2, mask)
    assert means[0] == pytest.approx(2 * (1 - eor(ids)))
    assert 0 < probs[0] <= 1


def test_remoe_vs_hardware_sticky_routing_wins():
    cfg = preset("tiny-moe", num_local_experts=8, num_experts_per_tok=2)
    L = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    rng = np.random.default_rng(0)
    random_ids = np.stack([np.stack([rng.choice(8, 2, replace=False) for _ in range(300)]) for _ in range(L)])
    sticky = np.stack([np.repeat(random_ids[l, ::20], 20, axis=0) for l in range(L)])  # same experts 20 tokens
    slow = get_profile("galaxy-s25")
    inp = D.RemoeInputs(cfg, _trace(random_ids), _trace(sticky), capacity=2, context=256)
    res = D.remoe_vs_hardware(inp, slow, get_profile("jetson-orin-nx"), upgrade_cost=500.0, latency_us=200.0)
    rows = res["rows"]
    assert rows["after ReMoE"]["misses_per_token"] < rows["before ReMoE"]["misses_per_token"] / 5
    assert rows["after ReMoE"]["tpot_ms"] < rows["before ReMoE"]["tpot_ms"]
    assert rows["upgrade + ReMoE"]["tpot_ms"] < rows["upgrade, before ReMoE"]["tpot_ms"]
    assert res["verdict"].startswith("run ReMoE before ordering hardware")
    # with measured numbers the rows say measured, the upgrade is calibrated by measured/projected
    inp.measured = {k: {"offloaded": {"tpot_ms": v, "misses_per_token": 1.0}} for k, v in (("before", 2.0), ("after", 1.0))}
    res2 = D.remoe_vs_hardware(inp, slow, get_profile("jetson-orin-nx"), latency_us=200.0)
    assert res2["rows"]["before ReMoE"]["source"] == "measured"
    assert res2["rows"]["upgrade, before ReMoE"]["source"] == "calibrated"
    assert res2["rows"]["upgrade, before ReMoE"]["tpot_ms"] == pytest.approx(
        rows["upgrade, before ReMoE"]["tpot_ms"] * 2.0 / rows["before ReMoE"]["tpot_ms"])


def test_remoe_verdict_cases():
    assert "does not help" in D.remoe_verdict(1.0, 1.0, 0.5, None)
    assert "the upgrade is faster" in D.remoe_verdict(1.0, 0.8, 0.4, 300)
    assert D.remoe_verdict(1.0, 0.5, 0.8, 300, remoe_cost=10).startswith("ReMoE is faster per unit cost")


def test_remoe_cli_end_to_end(tmp_path, capsys):
    """Tiny checkpoint + router delta from `remoe train`: the table and verdict, --json, projected only."""
    import torch

    from mobilemoe.checkpoint import save_checkpoint
    from mobilemoe.data.tokenizer import train_bpe
    from mobilemoe.model import MobileMoEForCausalLM

    TEXT = "The quick brown fox jumps over the lazy dog. Question: two plus two? def add(a, b): return a + b\n"
    tok = train_bpe([TEXT] * 20, vocab_size=300)
    torch.manual_seed(0)
    d = tmp_path / "mm"
    cfg = preset("tiny-moe", vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=32, intermediate_size_mlp=32,
                 num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                 max_position_embeddings=128, num_local_experts=8, num_experts_per_tok=2)
    save_checkpoint(MobileMoEForCausalLM(cfg), d)
    tok.save(d)
    text = tmp_path / "text.txt"
    text.write_text(TEXT * 100)
    assert main(["remoe", "train", "--model", str(d), "--data", str(text), "--steps", "3", "--warmup", "1",
                 "--t-warm", "1", "--grad-accum", "1", "--seq-len", "32", "--out", str(tmp_path / "r"),
                 "--no-progress", "--json"]) == 0
    capsys.readouterr()
    args = ["decide", "remoe-vs-hardware", "--model", str(d), "--routers", str(tmp_path / "r" / "routers.safetensors"),
            "--device", "galaxy-s25", "--upgrade", "jetson-orin-nx", "--capacity", "3", "--data", str(text),
            "--seq-len", "32", "--windows", "4"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "before ReMoE" in out and "upgrade + ReMoE" in out and "verdict:" in out
    assert main(args + ["--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["capacity"] == 3 and res["trace_tokens"] == 4 * 32
    assert main(args[:-6] + ["--capacity", "1"]) == 2  # below top-k
    assert "between top-k" in capsys.readouterr().err


def test_remoe_default_workload_is_sharegpt(shared_data, monkeypatch):
    root = shared_data("sharegpt/ShareGPT_V3_filtered_1000.json")
    from mobilemoe.commands.decide import _default_data

    assert Path(_default_data()) == root / "sharegpt" / "ShareGPT_V3_filtered_1000.json"


# ---------------------------------------------------------------------- this machine's profile
def test_measured_profile_loads_and_predicts(tmp_path):
    res = D.measure_profile("probe", quick=True)
    path = D.write_profile(res["profile"], tmp_path / "this.yaml")
    prof = load_profile(path)
    assert prof.name == "probe" and prof.memory_bandwidth_gbs > 0 and prof.compute_gflops["int8"] > 0
    assert 0 < prof.bandwidth_efficiency <= 1
    m = res["measurements"]
    assert m["int4_gemm"]["gflops"] > 0 and m["disk_latency_us"] > 0
    # the roofline on it: decode of a bigger model is slower
    assert D.roofline_tpot_s(preset("mobilemoe-l"), prof, 256) > D.roofline_tpot_s(preset("mobilemoe-s"), prof, 256)
