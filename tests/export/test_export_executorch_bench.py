"""benchmarks/export_executorch.py's core (``measure``) on a 1-layer random INT4 tiny-moe: every field
of the report exists, the poisoned-expert check passes, and the routed-expert bytes per decoded token
are top_k x MoE layers x one expert's blob bytes (the universal blob layout's size)."""

import importlib.util
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    path = ROOT / "benchmarks" / "export_executorch.py"
    spec = importlib.util.spec_from_file_location("export_executorch_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _blob_bytes(N, K, group=32):
    """torchao's universal INT4 blob of one [N, K] matrix: 64-byte header, then per 8-row tile and
    group of 32: 8 x 32 nibbles, 8 fp32 scales, 8 int32 code sums."""
    return 64 + math.ceil(N / 8) * (K // group) * (8 * group // 2 + 8 * 4 + 8 * 4)


def test_export_executorch_bench_smoke(tmp_path):
    pytest.importorskip("executorch.runtime", reason="executorch is not installed")
    pytest.importorskip("torchao", reason="torchao is not installed")
    from mobilemoe.bench.random_int4 import write_random_int4_checkpoint
    from mobilemoe.config import preset

    bench = _bench()
    ckpt = write_random_int4_checkpoint(preset("tiny-moe"), tmp_path / "tiny-int4")
    r = bench.measure(ckpt, tmp_path / "work", layers=1, positions=8, seq_len=8, prompt=4, gen=2, reps=1,
                      poison_prompt=8, prefill_chunk=1)  # one method: half the export
    assert r["layers"] == {"used": 1, "of": 4, "truncated": True}
    assert r["export"]["seconds"] > 0 and r["export"]["pte_bytes"] > 0 and r["export"]["peak_rss_mb"] > 0

    p = r["poisoned"]
    assert p["poisoned_total"] > 0  # 8 tokens x top-4 leave experts of the 16 unchosen
    assert p["finite"] is True and p["bit_equal_to_unpoisoned"] is True

    cfg = r["config"]
    eb = r["expert_bytes"]
    H, I = cfg["hidden_size"], cfg["intermediate_size"]
    assert eb["expert_blob_bytes"] == _blob_bytes(2 * I, H) + _blob_bytes(H, I)
    assert eb["pte_bytes_per_token"] == eb["top_k"] * eb["moe_layers"] * eb["expert_blob_bytes"]
    assert eb["top_k"] == cfg["num_experts_per_tok"] and eb["moe_layers"] == 1
    assert eb["ratio_pte_over_accounting"] == pytest.approx(
        eb["pte_bytes_per_token"] / eb["accounting_int4_bytes_per_token"], abs=1e-3)
    assert 1.3 < eb["ratio_pte_over_accounting"] < 1.4  # 24 vs 18 bytes a group, plus headers

    for runtime in ("pte", "native"):
        f = r["fidelity"][runtime]
        assert f["positions"] == 8 and math.isfinite(f["max_abs"]) and math.isfinite(f["kl"])
        assert 0.0 <= f["top1"] <= 1.0
        s = r["speed"][runtime]
        assert s["prefill_tok_s"]["median"] > 0 and s["decode_tok_s"]["median"] > 0
    assert "top1_minus_native_pts" in r["fidelity"]["pte"]
    assert r["speed"]["threads"]["executorch_threadpool"] == 1

    # the routed program also runs from a fresh process (nothing exported there first, so nothing has
    # registered llama::quantized_moe_ffn yet): `mobilemoe generate --model X.pte`
    import json
    import subprocess
    import sys

    pte = tmp_path / "work" / "model.pte"
    cli = Path(sys.executable).with_name("mobilemoe")
    proc = subprocess.run([str(cli), "generate", "--model", str(pte), "--prompt-ids", "1,2,3", "--max-new-tokens",
                           "2", "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["artifact"] == "pte"
