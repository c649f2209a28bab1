"""``python -m mobilemoe.bench.device``: mobilemoe bench's JSON plus a device block, offline, one-line errors."""

from __future__ import annotations

import json
import sys

import pytest

from mobilemoe import kernels
from mobilemoe.bench import device, system
from mobilemoe.cli import main as cli_main

TINY = ["--dense", "tiny-dense", "--contexts", "256", "--decode-tokens", "8", "--repeats", "1", "--threads", "1"]
DEVICE_KEYS = {"os", "cpu", "cpu_features", "logical_cpus", "threads", "memory_total_bytes",
               "memory_available_bytes", "kernel_isa", "kernel_isas_available", "kernel_isa_env", "python", "quick"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("bench-models")


@pytest.mark.skipif(not kernels.is_available(), reason="mobilemoe._C not built")
def test_quick_report_is_bench_json_plus_device(cache, tmp_path, capsys):
    out = tmp_path / "dev.json"
    assert device.main(["--quick", "--preset", "tiny-moe", *TINY, "--cache-dir", str(cache), "--out", str(out)]) == 0
    dev = json.loads(out.read_text())
    capsys.readouterr()
    assert cli_main(["bench", "--moe", "tiny-moe", *TINY, "--cache-dir", str(cache), "--json"]) == 0
    bench = json.loads(capsys.readouterr().out)

    assert set(dev) == set(bench) | {"device"}
    block = dev["device"]
    assert set(block) == DEVICE_KEYS
    assert block["quick"] is True and block["threads"] == dev["bench_config"]["threads"] == 1
    # the ISA the workers report having run is one this CPU can run, and the one auto-dispatch picks
    assert block["kernel_isa"] in block["kernel_isas_available"]
    assert block["kernel_isa"] == kernels.active_isa()
    assert all(k["backend"] == "NativeBackend" for k in dev["kernels"].values())
    assert all(k["kernel_paths"]["isa"] == block["kernel_isa"] for k in dev["kernels"].values())
    assert {k["kernel_paths"]["prefill_attention"] for k in dev["kernels"].values()} <= {"amx-bf16", "avx512bf16", "sdpa"}
    assert block["memory_total_bytes"] > 0 and block["os"]["machine"]
    if block["os"]["machine"] in ("x86_64", "AMD64"):
        assert "avx2" in block["cpu_features"] or block["kernel_isas_available"] == ["portable"]
    for key in ("moe_decode_tok_s_256", "moe_prefill_tok_s_256", "moe_ttft_s_256", "moe_peak_rss_bytes"):
        assert dev[key] > 0


def test_refuses_politely_without_the_extension(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(kernels, "_C", None)
    monkeypatch.setattr(kernels, "_IMPORT_ERROR", ImportError("no module named mobilemoe._C"))
    out = tmp_path / "dev.json"
    assert device.main(["--quick", "--preset", "tiny-moe", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error: the native INT4 kernels (mobilemoe._C) are not built" in err[0]
    assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--contexts", "1k"], "--contexts: expected comma-separated integers"),
    (["--threads", "0"], "--threads: expected a positive number"),
    (["--model", "/nonexistent/ckpt"], "not a checkpoint directory"),
])
def test_bad_input_is_one_line(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(device, "require_native_kernels", lambda backend: None)  # validation comes first anyway
    assert device.main([*args, "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_quick_defaults_and_full_defaults():
    quick = device.config_from_args(device.build_parser().parse_args(["--quick"]))
    full = device.config_from_args(device.build_parser().parse_args([]))
    assert (quick.contexts, quick.repeats, quick.decode_tokens) == ([256], 1, 8)
    assert full.contexts == [256, 1024, 2048] and (full.repeats, full.decode_tokens) == (5, 64)


def test_aarch64_features_line_is_reported_whole(monkeypatch):
    monkeypatch.setattr(system, "_cpuinfo_fields", lambda *keys: {"Features": "fp asimd i8mm asimddp sve"})
    assert system.cpu_features() == ["asimd", "asimddp", "fp", "i8mm", "sve"]


def test_x86_flags_keep_the_simd_ones(monkeypatch):
    monkeypatch.setattr(system, "_cpuinfo_fields", lambda *keys: {"flags": "fpu sse avx2 avx512f amx_int8 fma ht"})
    assert system.cpu_features() == ["amx_int8", "avx2", "avx512f", "fma"]


def test_macos_sysctl_arm_features(monkeypatch):
    monkeypatch.setattr(system, "_cpuinfo_fields", lambda *keys: {})
    monkeypatch.setattr(sys, "platform", "darwin")
    listing = "hw.optional.arm.FEAT_DotProd: 1\nhw.optional.arm.FEAT_I8MM: 0\nhw.optional.arm.FEAT_BF16: 1\n"
    monkeypatch.setattr(system, "sysctl", lambda name, names=False: listing if names else None)
    assert system.cpu_features() == ["FEAT_BF16", "FEAT_DotProd"]


def test_termux_is_detected_from_its_environment(monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv("TERMUX_VERSION", "0.118.0")
    monkeypatch.setattr(system, "_getprop", lambda key: {"ro.product.model": "Pixel 8"}.get(key))
    info = system.os_info()
    assert info["termux"] and info["android"] and info["device_model"] == "Pixel 8"
