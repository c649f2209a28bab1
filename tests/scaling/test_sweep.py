import json

import pytest

from mobilemoe.cli import main
from mobilemoe.scaling.law import read_runs
from mobilemoe.scaling.sweep import RunTable, SweepError, parse_grid, run_sweep

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

    def fake_train_one(cfg, tokens, out_dir):
        key = out_dir.name
        calls.append(key)
        if any(key.startswith(f) for f in fail_once):
            fail_once.clear()
            raise RuntimeError("simulated crash")
        return 10.0 / (cfg.hidden_size ** 0.3) + 5.0 / tokens ** 0.2

    pts = parse_grid(GRID)
    table = tmp_path / "runs.jsonl"
    first = run_sweep(pts[:7], fake_train_one, table, tmp_path / "runs", log=None)
    assert first == {"done": 6, "skipped": 0, "failed": 1}
    calls.clear()
    second = run_sweep(pts, fake_train_one, table, tmp_path / "runs", log=None)
    assert second == {"done": 6, "skipped": 6, "failed": 0}
    assert len(calls) == 6  # 5 new runs + the retried failure; finished ones were not retrained
    third = run_sweep(pts, lambda *a: pytest.fail("nothing should train"), table, tmp_path / "runs", log=None)
    assert third == {"done": 0, "skipped": 12, "failed": 0}
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
    assert "single-E Chinchilla form (E=8)" in out and law_path.exists()
    assert main(["plan", "--memory-gb", "0.7", "--law", str(law_path), "--experts", "8", "--granularity", "8",
                 "--top-k", "1", "--no-dense", "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "DEFAULT" not in out and "E8 g8 k1 s4" in out
