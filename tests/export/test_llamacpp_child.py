"""llama.cpp runs in a child process: a crash there is one clear line, never a dead pytest or benchmark."""

import importlib.util
import json
import re
import signal
import time

import pytest

from mobilemoe.bench.llamacpp import CRASH_HOOK_ENV, LlamaCppCrash, run_in_child, system_info
from mobilemoe.errors import MobileMoEError
from mobilemoe.export.llamacpp_logits import llama_logits

HAVE_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None


def test_child_killed_by_sigill_is_one_line():
    with pytest.raises(LlamaCppCrash) as info:
        run_in_child(signal.raise_signal, signal.SIGILL, what="decoding model.gguf")
    msg = str(info.value)
    assert msg.startswith("llama.cpp crashed (SIGILL, Illegal instruction) while decoding model.gguf"), msg
    assert "\n" not in msg


def test_crash_inside_the_logits_path_is_reported(tmp_path, monkeypatch):
    """The hook makes the child that would load llama.cpp die by SIGSEGV: the parent survives it."""
    monkeypatch.setenv(CRASH_HOOK_ENV, "SIGSEGV")
    with pytest.raises(LlamaCppCrash, match=r"^llama\.cpp crashed \(SIGSEGV, Segmentation fault\) "
                                            r"while decoding m\.gguf"):
        llama_logits(tmp_path / "m.gguf", [1, 2, 3])


def test_child_errors_and_timeouts_are_one_line():
    with pytest.raises(MobileMoEError, match=r"^llama\.cpp failed while parsing: ValueError: invalid literal"):
        run_in_child(int, "x", what="parsing")
    t0 = time.perf_counter()
    with pytest.raises(LlamaCppCrash, match=r"^llama\.cpp timed out after 0\.5 s while sleeping$"):
        run_in_child(time.sleep, 30, what="sleeping", timeout=0.5)
    assert time.perf_counter() - t0 < 20


@pytest.mark.skipif(not HAVE_LLAMA_CPP, reason="llama-cpp-python is not installed")
def test_unloadable_gguf_is_a_clear_error(tmp_path):
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf")
    with pytest.raises(MobileMoEError, match=r"bad\.gguf: llama\.cpp could not load this GGUF"):
        llama_logits(tmp_path / "bad.gguf", [1, 2, 3])


@pytest.mark.skipif(not HAVE_LLAMA_CPP, reason="llama-cpp-python is not installed")
def test_installed_llama_cpp_has_no_amx():
    """ggml's AMX matmul SIGILLs at tilezero on some AMX Xeons; scripts/install_llama_cpp.sh leaves it out."""
    info = run_in_child(system_info, what="reading llama.cpp's system info")
    assert "CPU :" in info, info
    assert not re.search(r"AMX\w* = 1", info), info


def test_bench_reports_a_llama_cpp_crash_and_keeps_mobilemoe(tmp_path, monkeypatch, capsys):
    """``bench --with-llama-cpp``: the llama.cpp workers die by SIGILL; the report says so in one line
    under "llama_cpp" and still has the mobilemoe numbers."""
    pytest.importorskip("gguf")
    import mobilemoe.bench.system as system
    from mobilemoe.cli import main

    monkeypatch.setattr(system, "dram_read_bandwidth_gbs", lambda: 10.0)  # skip the 1 GiB sweep
    monkeypatch.setenv(CRASH_HOOK_ENV, "SIGILL")
    assert main(["bench", "--moe", "tiny-moe", "--dense", "tiny-dense", "--contexts", "8", "--decode-tokens", "2",
                 "--repeats", "1", "--threads", "1", "--with-llama-cpp", "--cache-dir", str(tmp_path),
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["llama_cpp"] == {"error": "llama.cpp crashed (SIGILL, Illegal instruction) while loading moe:tiny-moe"}
    assert out["moe_decode_tok_s_8"] > 0 and out["dense_decode_tok_s_8"] > 0
    assert set(out["by_runtime"]) == {"mobilemoe", "ceilings"}
