"""set_isa governs every kernel: NativeModel's attention, router and prefill attention follow the
same ISA decision as the matmuls, and every ISA this CPU runs gives the same logits."""

import pytest
import torch

import mobilemoe.kernels as K
from mobilemoe.checkpoint import load_model, save_checkpoint
from mobilemoe.config import preset
from mobilemoe.model import MobileMoEForCausalLM
from mobilemoe.quant import quantize_checkpoint
from mobilemoe.runtime import Engine, native

pytestmark = pytest.mark.skipif(not native.is_available(), reason="mobilemoe._C is not built")

ISAS = ["portable", "avx2", "avx512", "amx"]
IDS = torch.randint(0, 512, (13,), generator=torch.Generator().manual_seed(0)).tolist()
PREFILL = 9  # then 4 decode steps


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A seeded random INT4 tiny-moe (head_dim 32, 2 query heads per KV head: the AVX-512 kernels apply)."""
    root = tmp_path_factory.mktemp("isa")
    model = MobileMoEForCausalLM(preset("tiny-moe", max_position_embeddings=64))
    model.reset_parameters(seed=1)
    save_checkpoint(model, root / "float")
    quantize_checkpoint(root / "float", root / "int4")
    return root / "int4"


@pytest.fixture(autouse=True)
def auto_isa(monkeypatch):
    """Each test starts from auto-detection, with the default prefill attention."""
    monkeypatch.delenv("MOBILEMOE_KERNEL_ISA", raising=False)
    monkeypatch.delenv("MOBILEMOE_PREFILL_ATTENTION", raising=False)
    K.set_isa(None)
    yield
    K.set_isa(None)


def _supported(isa):
    if isa not in K.available_isas():
        pytest.skip(f"this CPU does not run {isa}")


def _run(ckpt, isa):
    """(logits [5, V] of prefill + 4 decode steps, NativeModel.kernel_paths()) with ``isa`` forced."""
    K.set_isa(isa)
    engine = Engine.load(ckpt, backend="native")
    logits = [engine.prefill(IDS[:PREFILL])] + [engine.decode(t) for t in IDS[PREFILL:]]
    return torch.stack(logits), engine.backend.model.kernel_paths()


def _bf16_prefill_possible(D=32):
    K.set_isa("avx512")
    try:
        return K._lib().prefill_bf16_available(D)
    finally:
        K.set_isa(None)


@pytest.mark.parametrize("isa", ISAS)
def test_every_path_follows_set_isa(ckpt, isa):
    _supported(isa)
    _, paths = _run(ckpt, isa)
    fast = "avx512" if isa in ("avx512", "amx") else "portable"  # amx: avx512 with AMX prefill GEMMs
    bf16 = fast == "avx512" and _bf16_prefill_possible()
    prefill = ("amx-bf16" if isa == "amx" else "avx512bf16") if bf16 else "sdpa"  # (D = 32: AMX tiles)
    assert paths == {"isa": isa, "attention": fast, "router": fast, "prefill_attention": prefill}


@pytest.mark.parametrize("isa", ISAS)
def test_logits_agree_across_isas_and_with_reference(ckpt, isa):
    """Each ISA against portable (only fp32 summation order and, on AVX-512 BF16, the bf16 prefill
    attention differ) and against the PyTorch reference (the native runtime's own tolerance)."""
    _supported(isa)
    got, _ = _run(ckpt, isa)
    base, _ = _run(ckpt, "portable")
    with torch.no_grad():
        ref = load_model(ckpt).eval()(torch.tensor([IDS])).logits[0, PREFILL - 1:]
    scale = ref.abs().max().item()
    assert (got - base).abs().max().item() < 0.01 * scale, (isa, (got - base).abs().max())
    assert (got - ref).abs().max().item() < 0.02 * scale, (isa, (got - ref).abs().max())
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.8


def test_set_isa_after_load_governs_the_next_forward(ckpt):
    """The choice is made per forward, not frozen when the NativeModel is built."""
    _supported("avx512")
    engine = Engine.load(ckpt, backend="native")
    engine.prefill(IDS[:PREFILL])
    assert engine.backend.model.kernel_paths()["attention"] == "avx512"
    K.set_isa("portable")
    engine.decode(IDS[PREFILL])
    assert engine.backend.model.kernel_paths() == {"isa": "portable", "attention": "portable",
                                                   "router": "portable", "prefill_attention": "sdpa"}


def test_env_var_governs_model_paths_too(ckpt, monkeypatch):
    monkeypatch.setenv("MOBILEMOE_KERNEL_ISA", "portable")
    _, paths = _run(ckpt, None)
    assert paths["isa"] == paths["attention"] == paths["router"] == "portable"
    monkeypatch.setenv("MOBILEMOE_KERNEL_ISA", "nonsense")  # refused, as by the matmuls
    with pytest.raises(RuntimeError, match="unknown ISA 'nonsense'"):
        _run(ckpt, None)


def test_decode_attention_hook_follows_set_isa():
    """attend_kv_head's default kernel is the one NativeModel would pick: portable under set_isa."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 32, generator=gen)
    k, v = torch.randn(7, 32, generator=gen).half(), torch.randn(7, 32, generator=gen).half()
    K.set_isa("portable")
    assert torch.equal(K._lib().attend_kv_head(q, k, v), K._lib().attend_kv_head(q, k, v, True))
