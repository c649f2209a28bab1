"""`generate --model` on exported artifacts (.gguf through llama.cpp in a child, .pte through ExecuTorch):
the same greedy tokens as the checkpoint, one-line errors for crashes and flags that do not apply."""

import importlib.util
import json
import os
import signal

import pytest

from mobilemoe.bench.llamacpp import CRASH_HOOK_ENV, LlamaCppCrash
from mobilemoe.cli import main
from mobilemoe.errors import MobileMoEError
from mobilemoe.runtime.artifacts import LlamaCppBackend, PteBackend, pte_cache_length
from mobilemoe.runtime.engine import Engine

HAVE_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
HAVE_EXECUTORCH = importlib.util.find_spec("executorch") is not None and importlib.util.find_spec("torchao")
PROMPT = [5, 17, 99, 3, 250, 41]
needs_llama = pytest.mark.skipif(not HAVE_LLAMA_CPP, reason="llama-cpp-python is not installed")


@pytest.fixture(scope="module")
def gguf_path(int4_ckpt, tmp_path_factory):
    pytest.importorskip("gguf")
    from mobilemoe.export.gguf import export_gguf

    out = tmp_path_factory.mktemp("gguf") / "m.gguf"
    export_gguf(int4_ckpt, out, "int4")  # code-exact Q4_0 + Q8_0 experts: close to the checkpoint
    return out


@pytest.fixture(scope="module")
def pte_path(int4_ckpt, tmp_path_factory):
    if not HAVE_EXECUTORCH:
        pytest.skip("executorch/torchao are not installed")
    from mobilemoe.export.executorch import export_executorch

    out = tmp_path_factory.mktemp("pte") / "m.pte"
    export_executorch(int4_ckpt, out, max_seq_len=32, quantize=None, prefill_chunk=1)  # fp32, decode method only: one lowering
    return out


def _generate_json(capsys, model, *extra):
    capsys.readouterr()
    rc = main(["generate", "--model", str(model), "--prompt-ids", ",".join(map(str, PROMPT)),
               "--max-new-tokens", "8", "--json", *extra])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return json.loads(out)


def _error(capsys, *argv):
    capsys.readouterr()
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def _ref_logits(ckpt, ids):
    eng = Engine.load(ckpt, backend="reference")
    return eng.prefill(ids)


@needs_llama
def test_gguf_generate_matches_checkpoint(int4_ckpt, gguf_path, capsys):
    ref = _generate_json(capsys, int4_ckpt, "--backend", "reference")
    got = _generate_json(capsys, gguf_path)
    assert got["artifact"] == "gguf" and ref["artifact"] == "checkpoint"
    assert got["backend"] == "LlamaCppBackend"
    n = min(len(ref["ids"]), len(got["ids"]))
    assert n >= 4 and got["ids"][:n] == ref["ids"][:n], (got["ids"], ref["ids"])


@needs_llama
def test_gguf_logits_close_and_cache_kept_across_calls(int4_ckpt, gguf_path):
    """Prefill then decode steps through the child's KV cache; reset() starts over."""
    ref = Engine.load(int4_ckpt, backend="reference")
    eng = Engine.load(gguf_path)
    try:
        for _ in range(2):  # the second round proves reset() really clears the child's cache
            eng.reset(), ref.reset()
            a, b = eng.prefill(PROMPT[:4]), ref.prefill(PROMPT[:4])
            for tok in PROMPT[4:]:
                a, b = eng.decode(tok), ref.decode(tok)
            assert (a - b).abs().max() < 5e-2 * b.abs().max(), (a - b).abs().max()
            assert a.argmax() == b.argmax()
        assert eng.backend.max_seq_len == 64  # the GGUF's context length (the preset's 64 positions)
    finally:
        eng.backend.close()


@needs_llama
def test_gguf_sampling_is_seeded(gguf_path, capsys):
    flags = ("--temperature", "1.0", "--top-k", "50")
    a = _generate_json(capsys, gguf_path, *flags, "--seed", "3")
    b = _generate_json(capsys, gguf_path, *flags, "--seed", "3")
    assert a["ids"] == b["ids"]


@needs_llama
def test_killed_llama_child_is_one_line(gguf_path):
    be = LlamaCppBackend(gguf_path)
    be.forward(PROMPT[:2], 0)
    os.kill(be.process.pid, signal.SIGKILL)
    with pytest.raises(LlamaCppCrash) as info:
        be.forward(PROMPT[2:3], 2)
    msg = str(info.value)
    assert msg == "llama.cpp crashed (SIGKILL, Killed) while decoding m.gguf", msg


def test_llama_child_crash_at_load_is_one_line(gguf_path, capsys, monkeypatch):
    """The crash hook makes the child die by SIGILL as it loads llama.cpp: the CLI prints one line."""
    monkeypatch.setenv(CRASH_HOOK_ENV, "SIGILL")
    err = _error(capsys, "generate", "--model", str(gguf_path), "--prompt-ids", "1,2")
    assert err.endswith("llama.cpp crashed (SIGILL, Illegal instruction) while loading m.gguf"), err


def test_gguf_over_context_and_bad_file(gguf_path, tmp_path, capsys):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    assert "bad.gguf: not a readable GGUF file" in _error(capsys, "generate", "--model", str(bad),
                                                         "--prompt-ids", "1")
    if HAVE_LLAMA_CPP:
        err = _error(capsys, "generate", "--model", str(gguf_path), "--max-seq-len", "4", "--prompt-ids", "1,2,3")
        assert "context limit exceeded" in err, err


@pytest.mark.parametrize("flags", [["--cache-experts", "2"], ["--max-memory", "1MB"], ["--backend", "native"],
                                   ["--keep-page-cache"]])
@pytest.mark.parametrize("suffix", ["gguf", "pte"])
def test_checkpoint_only_flags_refused_for_artifacts(tmp_path, capsys, flags, suffix):
    art = tmp_path / f"m.{suffix}"
    art.write_bytes(b"x")  # refused before anything loads
    err = _error(capsys, "generate", "--model", str(art), "--prompt-ids", "1", *flags)
    assert f"{flags[0]}" in err and f"not to a .{suffix}" in err, err


@pytest.mark.parametrize("suffix", ["gguf", "pte"])
def test_text_prompts_and_chat_need_the_checkpoint(tmp_path, capsys, suffix):
    art = tmp_path / f"m.{suffix}"
    art.write_bytes(b"x")
    err = _error(capsys, "generate", "--model", str(art), "--prompt", "hello")
    assert "--prompt-ids" in err and f"a .{suffix} carries no mobilemoe tokenizer" in err, err
    err = _error(capsys, "chat", "--model", str(art))
    assert "exported artifact" in err, err


def test_engine_load_refuses_offload_for_artifacts(tmp_path):
    from mobilemoe.runtime.offload import ExpertOffload

    with pytest.raises(MobileMoEError, match=r"expert offloading .* not on a \.gguf"):
        Engine.load(tmp_path / "m.gguf", offload=ExpertOffload(capacity=2))


@pytest.mark.slow
def test_pte_generate_matches_checkpoint(int4_ckpt, pte_path, capsys):
    assert pte_cache_length(pte_path) == 32
    ref = _generate_json(capsys, int4_ckpt, "--backend", "reference")
    got = _generate_json(capsys, pte_path)
    assert got["artifact"] == "pte" and got["backend"] == "PteBackend"
    n = min(len(ref["ids"]), len(got["ids"]))
    assert n >= 4 and got["ids"][:n] == ref["ids"][:n], (got["ids"], ref["ids"])
    # logits: fp32 export = the model up to float rounding, fed one token per call through the static cache
    be = PteBackend(pte_path)
    ref_logits = _ref_logits(int4_ckpt, PROMPT)
    assert (be.forward(PROMPT, 0) - ref_logits).abs().max() < 1e-3
    # --max-seq-len is bounded by the static cache: 40 > 32 is clamped, and the request must fit
    err = _error(capsys, "generate", "--model", str(pte_path), "--max-seq-len", "40", "--prompt-ids",
                 ",".join(["1"] * 30), "--max-new-tokens", "8")
    assert "context limit exceeded" in err and "> 32" in err, err


def test_help_names_every_artifact(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert ".pte" in text and ".gguf" in text and "--prompt-ids" in text
