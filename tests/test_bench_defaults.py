"""`mobilemoe bench` and benchmarks/moe_vs_dense.py read one set of defaults (BenchConfig)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from mobilemoe.bench.moe_vs_dense import BenchConfig
from mobilemoe.cli import build_parser

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "moe_vs_dense.py"


def _script_defaults() -> dict:
    spec = importlib.util.spec_from_file_location("moe_vs_dense_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines the parser; main() only runs as __main__
    return vars(module.build_parser().parse_args([]))


def test_cli_and_script_share_the_bench_defaults():
    cli = vars(build_parser().parse_args(["bench"]))
    script = _script_defaults()
    shared = {"moe", "dense", "contexts", "decode_tokens", "repeats", "threads", "with_llama_cpp", "cache_dir"}
    assert shared <= cli.keys() and shared <= script.keys()
    assert {k: cli[k] for k in shared} == {k: script[k] for k in shared}


def test_defaults_are_the_published_protocol():
    """BENCHMARKS.md's sweeps are 5 repeats of 64 decode steps; both entry points default to them."""
    cfg = BenchConfig()
    assert (cfg.decode_tokens, cfg.repeats) == (64, 5)
    cli = build_parser().parse_args(["bench"])
    assert (cli.decode_tokens, cli.repeats) == (64, 5)
    assert [int(c) for c in cli.contexts.split(",")] == cfg.contexts
