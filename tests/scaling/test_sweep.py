import math
import json

import pytest

from mobilemoe.cli import main
from mobilemoe.scaling.law import read_runs
from mobilemoe.scaling.sweep import RunTable, SweepError, parse_grid, recipe_train_one, run_sweep, summarize

GRID = "d_model=64,128 layers=2 E=1,4 g=1,2 k=1 s=0 vocab=256 head_dim=32 kv_heads=2 tokens=1000,2000"


def test_parse_grid_drops_invalid_and_dedups_dense():
    pts = parse_grid(GRID)
    # dense ignores g: 2 d x 2 tokens x (1 dense + 2 MoE)
    assert len(pts) == 12
    assert len({p.key for p in pts}) == 12
    assert all(p.arch.vocab == 256 for p in pts)
    half = parse_grid("d_model=128 E=4 g=4 k=1 s=half tokens=10 vocab=256 head_dim=32 kv_heads=2")
    assert half[0].arch.s == 2 and half[0].arch.layers == 4  # layers default to the tiers' rule
    with pytest.raises(SweepError, match="'widht'"):
        parse_grid("widht=3 tokens=1")
    with pytest.raises(SweepError, match="'d_model'"):
        parse_grid("E=4 tokens=1")


def test_resume_skips_finished_runs_and_retries_failures(tmp_path):
    calls = []
    fail_once = {"d64-L2-E4-g2"}

    def fake_train_one(cfg, tokens, out_dir, seed):
        key = out_dir.name
        calls.append(key)
        if any(key.startswith(f) for f in fail_once):
            fail_once.clear()
            raise RuntimeError("simulated crash")
        return 10.0 / (cfg.hidden_size ** 0.3) + 5.0 / tokens ** 0.2

    pts = parse_grid(GRID)
    table = tmp_path / "runs.jsonl"
    first = run_sweep(pts[:7], fake_train_one, table, tmp_path / "runs", log=None)
    assert first == {"done": 6, "skipped": 0, "busy": 0, "failed": 1}
    calls.clear()
    second = run_sweep(pts, fake_train_one, table, tmp_path / "runs", log=None)
    assert second == {"done": 6, "skipped": 6, "busy": 0, "failed": 0}
    assert len(calls) == 6  # 5 new runs + the retried failure; finished ones were not retrained
    third = run_sweep(pts, lambda *a: pytest.fail("nothing should train"), table, tmp_path / "runs", log=None)
    assert third == {"done": 0, "skipped": 12, "busy": 0, "failed": 0}
    rows = RunTable(table).rows()
    assert sum(r["status"] == "done" for r in rows) == 12 and sum(r["status"] == "failed" for r in rows) == 1
    assert len(RunTable(table).done()) == 12
    runs = read_runs(table)  # the table is a valid law input (failed rows skipped)
    assert len(runs) == 12 and {r.family for r in runs} == {"dense", "k1-g1-s0", "k1-g2-s0"}


def test_interrupted_append_leaves_table_intact(tmp_path, monkeypatch):
    table = RunTable(tmp_path / "runs.jsonl")
    table.append({"key": "a", "status": "done", "loss": 1.0})
    import mobilemoe.utils as utils

    def boom(path, text):
        raise OSError("disk full")

    monkeypatch.setattr(utils, "atomic_write_text", boom)
    with pytest.raises(OSError):
        table.append({"key": "b", "status": "done", "loss": 2.0})
    assert [r["key"] for r in table.rows()] == ["a"]


def test_second_worker_skips_a_run_another_holds_and_sees_its_finished_rows(tmp_path):
    """Two workers on one table: a run whose directory is locked is left (busy, not failed), and a run
    another worker finished while this one was busy is not retrained."""
    from mobilemoe.utils import output_lock

    pts = parse_grid(GRID)[:3]
    table, root = tmp_path / "runs.jsonl", tmp_path / "runs"
    trained = []

    def train_one(cfg, tokens, out_dir, seed):
        with output_lock(out_dir, "train"):
            trained.append(out_dir.name)
            if out_dir.name == pts[1].key:  # meanwhile the other worker finishes pts[2]
                RunTable(table).append({"key": pts[2].key, "status": "done", "loss": 1.0})
            return 2.0

    with output_lock(root / pts[0].key, "train (the other worker)"):
        counts = run_sweep(pts, train_one, table, root, log=None)
    assert counts == {"done": 1, "skipped": 1, "busy": 1, "failed": 0}
    assert trained == [pts[1].key]
    assert RunTable(table).done() == {pts[1].key, pts[2].key}
    assert all(r["status"] == "done" for r in RunTable(table).rows())  # the busy run left no failed row


def test_concurrent_appends_keep_every_row(tmp_path):
    import threading

    table = RunTable(tmp_path / "runs.jsonl")

    def writer(w):
        for i in range(25):
            table.append({"key": f"w{w}-{i}", "status": "done", "loss": 1.0})

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(table.done()) == 100


def test_cli_fit_only_and_dry_run(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: t\nmodel: {preset: tiny-moe, overrides: {vocab_size: 320}}\n"
                      "data: {source: stdlib, tokenizer: byte, limit_files: 2}\n"
                      "stages:\n  - {name: pretrain, seq_len: 32, micro_batch_size: 2, max_steps: 2}\n")
    assert main(["sweep", str(recipe), "--grid", "d_model=64 layers=2 E=1,4 g=2 tokens=1000 head_dim=32 kv_heads=2",
                 "--out", str(tmp_path / "o"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("todo") == 2 and "v320" in out
    # fit-only on a table written by hand
    table = tmp_path / "runs.jsonl"
    with open(table, "w") as fh:
        for i, (n, d) in enumerate([(n, d) for n in (1e7, 3e7, 1e8, 3e8) for d in (1e9, 3e9, 1e10)]):
            loss = 400 * n ** -0.33 + 1500 * d ** -0.32 + 1.8
            fh.write(json.dumps({"key": str(i), "status": "done", "n_act": n, "tokens": d, "e": 8, "loss": loss,
                                 "family": "k1-g8-s4"}) + "\n")
    law_path = tmp_path / "law.yaml"
    assert main(["sweep", "--table", str(table), "--fit", str(law_path), "--bootstrap", "4", "--starts", "3"]) == 0
    out = capsys.readouterr().out
    assert "single-E Chinchilla form (E=8)" in out and "12 runs at 12 points" in out and law_path.exists()
    assert main(["plan", "--memory-gb", "0.7", "--law", str(law_path), "--experts", "8", "--granularity", "8",
                 "--top-k", "1", "--no-dense", "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "DEFAULT" not in out and "E8 g8 k1 s4" in out


def test_seed_axis_expands_grid_and_keeps_seed_zero_keys():
    base = parse_grid(GRID)
    seeded = parse_grid(GRID + " seed=0,1,2")
    assert len(seeded) == 3 * len(base) == len({p.key for p in seeded})
    assert {p.seed for p in seeded} == {0, 1, 2}
    # seed 0 keeps the pre-seed key (old tables resume as seed 0); other seeds share the point key
    assert {p.key for p in seeded if p.seed == 0} == {p.key for p in base}
    p1 = next(p for p in seeded if p.seed == 1)
    assert p1.key == p1.point_key + "-S1"
    with pytest.raises(SweepError, match="'seed'.*non-negative"):
        parse_grid("d_model=64 tokens=10 seed=-1")


def test_resume_skips_finished_point_seed_pairs(tmp_path):
    pts = parse_grid("d_model=64 layers=2 E=1 vocab=256 head_dim=32 kv_heads=2 tokens=1000 seed=0,1,2")
    calls = []

    def fake(cfg, tokens, out_dir, seed):
        calls.append((out_dir.name, seed))
        return 3.0 + 0.01 * seed

    table = tmp_path / "runs.jsonl"
    assert run_sweep(pts[:2], fake, table, tmp_path / "r", log=None) == {"done": 2, "skipped": 0, "busy": 0, "failed": 0}
    calls.clear()
    assert run_sweep(pts, fake, table, tmp_path / "r", log=None) == {"done": 1, "skipped": 2, "busy": 0, "failed": 0}
    assert calls == [(pts[2].key, 2)]  # only the missing seed trained, with its own seed and directory
    rows = RunTable(table).rows()
    assert [r["seed"] for r in rows] == [0, 1, 2] and len({r["point"] for r in rows}) == 1


def test_summarize_mean_and_standard_error():
    rows = [{"key": "a", "point": "a", "seed": 0, "status": "done", "loss": 3.0, "family": "dense", "n_act": 1,
             "tokens": 10},
            {"key": "a-S1", "point": "a", "seed": 1, "status": "done", "loss": 3.2, "family": "dense", "n_act": 1,
             "tokens": 10},
            {"key": "a-S2", "point": "a", "seed": 2, "status": "failed", "error": "x"},
            {"key": "a-S2", "seed": 2, "status": "done", "loss": 3.4, "family": "dense", "n_act": 1, "tokens": 10},
            {"key": "b", "status": "done", "loss": 2.0, "family": "dense", "n_act": 2, "tokens": 10},  # pre-seed row
            {"key": "b-S1", "seed": 1, "status": "done", "loss": 9.0, "family": "dense", "n_act": 2, "tokens": 10},
            {"key": "b-S1", "seed": 1, "status": "failed", "error": "rerun crashed"}]  # latest row wins
    a, b = summarize(rows)
    assert a["point"] == "a" and a["n"] == 3 and a["seeds"] == [0, 1, 2]
    assert a["mean"] == pytest.approx(3.2) and a["std"] == pytest.approx(0.2)
    assert a["se"] == pytest.approx(0.2 / 3 ** 0.5)
    assert b["point"] == "b" and b["n"] == 1 and b["se"] is None and b["mean"] == 2.0


def _tiny_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: t\nmodel: {preset: tiny-moe, overrides: {vocab_size: 320}}\n"
                      "data: {source: stdlib, tokenizer: byte, limit_files: 2, val_fraction: 0.5}\n"
                      "stages:\n  - {name: pretrain, seq_len: 32, micro_batch_size: 2, max_steps: 2, lr: 3.0e-3,"
                      " warmup_steps: 1, eval_every: 100000, eval_steps: 2, checkpoint_every: 100000}\n")
    return recipe


def test_seed_changes_training_and_same_seed_repeats(tmp_path):
    train_one = recipe_train_one(_tiny_recipe(tmp_path))
    (p,) = parse_grid("d_model=64 layers=1 E=1 vocab=320 head_dim=32 kv_heads=2 tokens=128")
    cfg = p.arch.to_config()
    s0 = train_one(cfg, p.tokens, tmp_path / "a", 0)
    s0_again = train_one(cfg, p.tokens, tmp_path / "b", 0)
    s1 = train_one(cfg, p.tokens, tmp_path / "c", 1)
    assert s0 == s0_again
    assert abs(s0 - s1) > 1e-6


def test_cli_table_prints_mean_se_per_point(tmp_path, capsys):
    table = tmp_path / "runs.jsonl"
    pts = parse_grid("d_model=64 layers=2 E=1,4 g=1 k=1 vocab=256 head_dim=32 kv_heads=2 tokens=1000 seed=0,1")
    run_sweep(pts, lambda cfg, t, d, seed: 3.0 + 0.1 * seed + (0.5 if "-E4-" in d.name else 0.0), table,
              tmp_path / "r", log=None)
    assert main(["sweep", "--table", str(table)]) == 0
    out = capsys.readouterr().out
    assert out.count("+- 0.0500") == 2 and "3.0500" in out and "3.5500" in out  # SE of {x, x+0.1}: 0.0707/sqrt 2
    assert main(["sweep", "--table", str(table), "--json"]) == 0
    points = json.loads(capsys.readouterr().out)["points"]
    assert [g["n"] for g in points] == [2, 2]
    assert main(["sweep", "--table", str(tmp_path / "missing.jsonl")]) == 2
    assert "no such run table" in capsys.readouterr().err


def _bench():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "scaling_sweep.py"
    spec = importlib.util.spec_from_file_location("scaling_sweep_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_equal_memory_plan_brackets_moe_int4_bytes_with_seeds():
    from mobilemoe.scaling.space import stats

    bench = _bench()
    grids = bench.equal_memory_plan(512, (bench.LOW_TOKENS, 2_000_000))
    pts = [p for ps in grids.values() for p in ps]
    dense = {stats(p.arch).int4_bytes for p in pts if p.arch.is_dense}
    moe = [p for p in pts if not p.arch.is_dense]
    assert moe and {stats(p.arch).int4_bytes for p in moe}
    for p in moe:  # every MoE memory lies inside the dense range, with dense points on both sides
        b = stats(p.arch).int4_bytes
        assert min(dense) <= b <= max(dense), p.arch.label()
        # the equal-active comparison is kept: a dense model at each MoE d_model
        assert any(q.arch.is_dense and q.arch.d_model == p.arch.d_model for q in pts)
    assert 256 in {p.arch.d_model for p in pts if p.arch.is_dense}
    by_point: dict = {}
    for p in pts:
        by_point.setdefault(p.point_key, set()).add(p.seed)
    assert all(len(s) >= 3 for s in by_point.values()) and len(pts) == len({p.key for p in pts})
    # the token budget: the largest of the ladder whose estimate fits the hours, estimate counts only todo runs
    rates = bench.DEFAULT_RATES
    high, est = bench.choose_tokens(512, 6.0, rates, set())
    assert high > 1_000_000 and est <= 6 * 3600
    all_keys = {p.key for p in pts}
    assert bench.estimate_seconds(pts, rates, all_keys) == 0
    big, _ = bench.choose_tokens(512, 1000.0, rates, set())
    assert big == bench.TOKEN_LADDER[0]


def test_comparisons_carry_standard_errors_and_verdicts():
    bench = _bench()

    def row(fam, d, int4, loss, se):
        return {"family": fam, "d_model": d, "tokens": 1e6, "int4_bytes": int4, "n_act": d * 1e4, "loss": loss,
                "se": se, "n": 3}

    rows = [row("dense", 64, 1e6, 3.0, 0.01), row("dense", 128, 4e6, 2.8, 0.01),
            row("k1-g8-s4", 64, 2e6, 2.95, 0.01)]  # at 2 MB, halfway (log) between the dense points
    out = bench.compare(rows)
    (mem,) = out["matched_memory"]
    dense_at = math.exp(0.5 * math.log(3.0) + 0.5 * math.log(2.8))
    assert mem["dense_loss_at_same_memory"] == pytest.approx(dense_at)
    assert mem["dense_se"] == pytest.approx(dense_at * math.hypot(0.5 * 0.01 / 3.0, 0.5 * 0.01 / 2.8))
    assert mem["moe_minus_dense_se"] == pytest.approx(math.hypot(0.01, mem["dense_se"]))
    assert mem["verdict"] == "MoE worse" and not mem["dense_extrapolated"]  # +0.052 at SE 0.012
    (act,) = out["matched_active"]
    moe = act["fine-grained + shared"]
    assert moe["minus_dense"] == pytest.approx(-0.05) and moe["verdict"] == "MoE better"
    assert bench.verdict(0.015, 0.01) == "not distinguishable" and bench.verdict(-0.03, 0.01) == "MoE better"
    assert bench.verdict(0.5, None) == "one seed: no verdict"


def test_tier_predictions_compare_at_equal_int4_memory_with_intervals():
    from mobilemoe.scaling.law import FitResult, LawParams
    from mobilemoe.scaling.space import stats, tier_arch

    bench = _bench()

    def fit(family, a, samples):
        p = LawParams(a=a, alpha=-0.3, b=1600.0, beta=-0.32, c=1.8)
        boot = [LawParams(a=x, alpha=-0.3, b=1600.0, beta=-0.32, c=1.8) for x in samples]
        return FitResult(params=p, objective=0.0, n_runs=9, family=family, joint=False, rmse_log=0.0, samples=boot)

    rows = bench.tier_predictions([fit("k1-g8-s4", 250.0, [240.0, 250.0, 260.0]),
                                   fit("dense", 300.0, [290.0, 300.0, 310.0])], tokens_list=(2e6,))
    assert [r["tier"] for r in rows] == list(bench.TIERS)
    for r in rows:
        assert r["int4_MB"] == pytest.approx(stats(tier_arch(r["tier"])).int4_bytes / 1e6)
        lo, hi = r["moe_minus_dense_interval"]
        assert lo <= r["moe_minus_dense"] <= hi and r["moe_interval"][0] <= r["moe_loss"] <= r["moe_interval"][1]
        assert r["dense_active_M"] > r["moe_active_M"]  # equal memory buys the dense model more active params
    assert bench.tier_predictions([fit("dense", 300.0, [])]) == []  # no MoE fit: nothing to say
