"""The engine's contract, run on every backend that is available."""

import json
import mmap

import pytest
import torch

from mobilemoe.checkpoint import load_model
from mobilemoe.config import ConfigError
from mobilemoe.errors import MobileMoEError
from mobilemoe.runtime import Engine, SamplingParams
from mobilemoe.runtime import native

BACKENDS = ["reference"] + (["native"] if native.is_available() else [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_incremental_decode_equals_full_forward(int4_ckpt, backend):
    engine = Engine.load(int4_ckpt, backend=backend)
    ref = load_model(int4_ckpt).eval()
    ids = torch.randint(0, 512, (20,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        full = ref(torch.tensor([ids])).logits[0]
    got = [engine.prefill(ids[:9])] + [engine.decode(t) for t in ids[9:]]
    for i, logits in zip(range(8, 20), got):
        tol = 1e-4 if backend == "reference" else 0.05 * full[i].abs().max().item()
        assert torch.allclose(logits, full[i], atol=tol), (i, (logits - full[i]).abs().max())


@pytest.fixture(scope="module", params=["tiny-dense", "tiny-moe-softmax"])
def variant_ckpt(request, make_int4_checkpoint):
    """Dense layers, softmax routing without a shared expert, untied head: the other code paths."""
    step = {} if request.param == "tiny-dense" else {"interleave_moe_layer_step": 2}
    return make_int4_checkpoint(request.param, seed=2, **step)


@pytest.mark.parametrize("backend", BACKENDS)
def test_variants_match_reference(variant_ckpt, backend):
    engine = Engine.load(variant_ckpt, backend=backend)
    ref = load_model(variant_ckpt).eval()
    ids = torch.randint(0, 512, (12,), generator=torch.Generator().manual_seed(3)).tolist()
    with torch.no_grad():
        full = ref(torch.tensor([ids])).logits[0]
    got = [engine.prefill(ids[:6])] + [engine.decode(t) for t in ids[6:]]
    for i, logits in zip(range(5, 12), got):
        assert torch.allclose(logits, full[i], atol=0.05 * full[i].abs().max().item()), i


@pytest.mark.parametrize("backend", BACKENDS)
def test_seeded_generation_is_reproducible(int4_ckpt, backend):
    engine = Engine.load(int4_ckpt, backend=backend)
    params = SamplingParams(temperature=0.9, top_k=50, top_p=0.9, seed=7)
    a = engine.generate([1, 2, 3], 12, params).ids
    b = engine.generate([1, 2, 3], 12, params).ids
    c = engine.generate([1, 2, 3], 12, SamplingParams(temperature=0.9, top_k=50, top_p=0.9, seed=8)).ids
    assert a == b and len(a) == 12
    assert a != c  # a different seed samples differently (12 tokens from a near-uniform model)


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_generation_matches_reference_argmax(int4_ckpt, backend):
    engine = Engine.load(int4_ckpt, backend=backend)
    out = engine.generate([5, 6, 7], 6)
    ref = load_model(int4_ckpt).eval()
    seq = [5, 6, 7]
    with torch.no_grad():
        for _ in range(6):
            seq.append(int(ref(torch.tensor([seq])).logits[0, -1].argmax()))
    assert out.ids == seq[3:]
    assert out.decode_steps == 5 and out.ttft_s > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_stop_tokens_and_streaming(int4_ckpt, backend):
    engine = Engine.load(int4_ckpt, backend=backend)
    first = engine.generate([9, 9], 8).ids
    # stop at the first token that did not appear before it (index 0 if the model repeats itself)
    k = next((i for i in range(1, len(first)) if first[i] not in first[:i]), 0)
    streamed = []
    out = engine.generate([9, 9], 8, stop_ids=[first[k]], on_token=streamed.append)
    assert out.stopped_by == "stop" and out.ids == first[:k] == streamed


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_requests_give_clear_errors(int4_ckpt, backend):
    engine = Engine.load(int4_ckpt, backend=backend)
    with pytest.raises(MobileMoEError, match="empty prompt"):
        engine.generate([], 4)
    with pytest.raises(MobileMoEError, match="context limit exceeded"):
        engine.generate(list(range(60)), 10)
    with pytest.raises(MobileMoEError, match=r"out of the vocabulary \[0, 512\): \[512, -1\]"):
        engine.generate([1, 512, -1], 4)
    assert engine.generate([1], 1).ids  # still usable after the errors


def test_wrong_quantization_format_is_rejected(int4_ckpt, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(int4_ckpt, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization"]["format"] = "gptq-int4"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="quantization.format"):
        Engine.load(bad)


def test_native_backend_refuses_float_checkpoint(int4_ckpt):
    with pytest.raises(MobileMoEError, match="mobilemoe quantize"):
        Engine.load(int4_ckpt.parent / "float", backend="native")


def test_generate_cli(int4_ckpt, capsys):
    from mobilemoe.cli import main

    assert main(["generate", "--model", str(int4_ckpt), "--prompt-ids", "1,2,3", "--max-new-tokens", "4", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["generated_tokens"] == 4 and record["prompt_tokens"] == 3
    assert main(["generate", "--model", str(int4_ckpt), "--prompt", "hi"]) == 2  # no tokenizer.json
    assert "no tokenizer.json" in capsys.readouterr().err


@pytest.mark.skipif(not native.is_available(), reason="native extension not built")
def test_chunked_packing_equals_whole_tensor_packing(monkeypatch):
    from mobilemoe.kernels.pack import pack_experts, pack_linear
    from mobilemoe.quant import quantize

    monkeypatch.setattr(native, "PACK_ROWS", 64)
    q, s = quantize(torch.randn(64 * 3 + 16 * 2, 64))  # chunks of 64 rows and a ragged tail
    assert torch.equal(native._pack_rows(q, s, pack_linear), pack_linear(q, s))
    q, s = quantize(torch.randn(5, 64, 96))
    for a, b in zip(native._pack_experts(q, s, pack_experts), pack_experts(q, s)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("hugepages", ["1", "0"])
def test_weight_buffer_shapes_and_lifetime(monkeypatch, hugepages):
    """Packed-weight buffers (own huge-page mapping from 2 MiB up, the shared small-weight arena below,
    or torch.empty) hold what is written, do not overlap, and stay valid after every other reference
    to their mapping is gone."""
    monkeypatch.setenv("MOBILEMOE_HUGEPAGES", hugepages)
    big = native.weight_buffer((3, 1 << 20), torch.uint8)  # 3 MiB: the mapped path where supported
    smalls = [native.weight_buffer((4, 8 + i), torch.float16) for i in range(3)]
    wide = native.weight_buffer((1000, 1000), torch.float32)  # 4 MB
    assert big.shape == (3, 1 << 20) and big.dtype == torch.uint8 and big.is_contiguous()
    assert [s.shape for s in smalls] == [(4, 8), (4, 9), (4, 10)] and smalls[0].dtype == torch.float16
    big.fill_(7)
    big[2, -1] = 9
    for i, s in enumerate(smalls):
        s.fill_(i)
    wide.fill_(1.5)
    import gc
    gc.collect()
    assert int(big.sum()) == 7 * (3 << 20) + 2
    assert [float(s.float().mean()) for s in smalls] == [0.0, 1.0, 2.0]
    assert float(wide.sum()) == 1.5e6
    if hugepages == "1" and hasattr(mmap, "MADV_HUGEPAGE"):
        assert big.data_ptr() % native.HUGE_PAGE == 0  # the mapped path, aligned to a huge page
        assert all(s.data_ptr() % 64 == 0 for s in smalls)  # arena slices, cache-line aligned
        arena = native._small_arena.base
        assert arena.data_ptr() <= smalls[-1].data_ptr() < arena.data_ptr() + arena.numel()
