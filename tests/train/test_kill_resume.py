"""A `mobilemoe train` process killed with SIGKILL mid-run resumes (--resume) exactly (BPE tokenizer,
token shards and the mobilemoe.data PretrainLoader, across an epoch boundary)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch
import yaml

from mobilemoe.checkpoint import load_tensors

from trainutil import TEXT

MICRO = {"vocab_size": 320, "num_hidden_layers": 2, "hidden_size": 64, "head_dim": 16, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 32, "intermediate_size_mlp": 64, "num_local_experts": 8,
         "num_experts_per_tok": 2, "max_position_embeddings": 128}
STEPS = 80


def _cmd(recipe, out, *extra):
    return [sys.executable, "-m", "mobilemoe.cli", "train", str(recipe), "--out", str(out), "--no-progress", *extra]


def _losses(out):
    records = [json.loads(line) for line in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]  # resume truncates the log to its checkpoint


def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    (tmp_path / "corpus.txt").write_text(TEXT, encoding="utf-8")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "kill", "model": {"preset": "tiny-moe", "overrides": MICRO},
        "data": {"source": "corpus.txt", "tokenizer": "train", "vocab_size": 300, "val_fraction": 0.0},
        "stages": [{"name": "pretrain", "seq_len": 16, "micro_batch_size": 2, "max_steps": STEPS, "lr": 3e-3,
                    "warmup_steps": 5, "checkpoint_every": 5, "bias_update_rate": 1e-2}]}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full, cut = tmp_path / "full", tmp_path / "cut"
    subprocess.run(_cmd(recipe, full), env=env, check=True, cwd=tmp_path, capture_output=True)

    proc = subprocess.Popen(_cmd(recipe, cut), env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    latest = cut / "pretrain" / "latest"
    deadline = time.time() + 120
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    assert proc.returncode == -9, "the run finished before it could be killed"
    assert not (cut / "pretrain" / "final").exists()

    subprocess.run(_cmd(recipe, cut, "--resume"), env=env, check=True, cwd=tmp_path, capture_output=True)
    assert _losses(cut) == _losses(full) and len(_losses(full)) == STEPS
    _, a = load_tensors(full / "pretrain" / "final")
    _, b = load_tensors(cut / "pretrain" / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)
