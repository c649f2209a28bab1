"""The native INT4 kernels equal their dequantize-then-matmul references, on every ISA path.

Two kinds of checks:
* exact-up-to-fp32-order: the kernel vs a reference fed the SAME int8-rounded activations
  (Q8_0 emulated in PyTorch below). Integer dots are exact, so only fp32 summation order differs:
  tolerance ~1e-5 relative. This pins the packed layout, nibble order, scale handling, bias trick.
* end-to-end: kernel vs the plain fp32 reference. The only approximation is rounding activations
  to int8 per block of 32 (step = max|a|/127, error <= step/2, rms ~0.5% of a Gaussian block's
  values), which gives ~0.5% relative output error per matmul (~1% after two chained matmuls of
  the MoE). Bounds used: 1.5% per matmul, 2.5% for the MoE layer.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from mobilemoe import kernels as K
from mobilemoe.kernels import reference as R
from mobilemoe.quant import dequantize, quantize

pytestmark = pytest.mark.skipif(not K.is_available(), reason="mobilemoe._C not built")

ALL_ISAS = ["avx512", "avx2", "portable"]


@pytest.fixture(params=ALL_ISAS)
def isa(request):
    if request.param not in K.available_isas():
        pytest.skip(f"CPU lacks {request.param}")
    K.set_isa(request.param)
    yield request.param
    K.set_isa(None)


def block_amax(a: torch.Tensor) -> torch.Tensor:
    """max |a| per block of 32 along the last dim, broadcast back to a's shape."""
    b = a.float().unflatten(-1, (-1, 32))
    return b.abs().amax(-1, keepdim=True).expand_as(b).flatten(-2)


def scale_to(amax: torch.Tensor, numer: float) -> torch.Tensor:
    """numer / amax (0 where amax is 0) as ONE correctly rounded division, as the kernels compute it
    (`numer / amax` with a Python scalar would be amax.reciprocal() * numer: two roundings)."""
    return torch.where(amax > 0, torch.full_like(amax, numer) / amax, torch.zeros_like(amax))


def q8_roundtrip(a: torch.Tensor) -> torch.Tensor:
    """Emulate the kernels' activation quantization: int8 per block of 32, scale max|a|/127."""
    amax = block_amax(a)
    q = (a.float() * scale_to(amax, 127.0)).round().clamp(-127, 127)
    return q * (amax / 127.0)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def make_linear(n: int, k: int, seed: int, zero_groups: bool = True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    if zero_groups:
        w[0, :32] = 0  # a zero group: scale 0, codes 0
        w[n // 2, k - 32:] = 0
    q, s = quantize(w)
    return q, s


LINEAR_SHAPES = [(32, 32, 1), (96, 160, 1), (100, 96, 5), (160, 288, 67), (48, 1056, 3), (2000, 64, 2)]


@pytest.mark.parametrize("n,k,m", LINEAR_SHAPES)
def test_linear_matches_reference(isa, n, k, m):
    q, s = make_linear(n, k, seed=n * 7 + k + m)
    assert (s < 0).any() and (s > 0).any() and (s == 0).any()  # Q4_0 rule: signed scales; zero groups
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    x[0, :32] = 0  # a zero activation block
    x[-1, -32:] = 0
    pl = K.PackedLinear.from_quantized(q, s)
    y = pl(x)
    assert y.shape == (m, n) and y.dtype == torch.float32
    exact = R.linear_ref(q, s, q8_roundtrip(x))
    torch.testing.assert_close(y, exact, rtol=1e-4, atol=1e-5 * exact.abs().max().item())
    assert rel_err(y, R.linear_ref(q, s, x)) < 0.015


def test_linear_random_codes_negative_scales(isa):
    g = torch.Generator().manual_seed(3)
    q = torch.randint(0, 256, (64, 96 // 2), dtype=torch.uint8, generator=g)  # every code -8..7
    s = (torch.randn(64, 3, generator=g) * 0.1).to(torch.float16)
    s[5] = 0
    x = torch.randn(4, 96, generator=g) * 100
    y = K.PackedLinear.from_quantized(q, s)(x)
    exact = R.linear_ref(q, s, q8_roundtrip(x))
    torch.testing.assert_close(y, exact, rtol=1e-4, atol=1e-5 * exact.abs().max().item())


def test_linear_dtypes_and_batch_shape(isa):
    q, s = make_linear(64, 128, seed=1)
    pl = K.PackedLinear.from_quantized(q, s)
    x = torch.randn(2, 3, 128)
    y = pl(x.to(torch.bfloat16))
    assert y.shape == (2, 3, 64) and y.dtype == torch.bfloat16
    assert rel_err(y, R.linear_ref(q, s, x)) < 0.02
    assert pl(torch.randn(0, 128)).shape == (0, 64)


def expert_q8_reference(q: torch.Tensor, s: torch.Tensor, e: int, x: torch.Tensor) -> torch.Tensor:
    """Emulate the expert path (csrc/mm_common.h): for out-group g the activation x[i] * scale[i, g] is
    rounded to int8 as round(u * sn) with u = x * 127/max|x|_b and sn = scale / max|scale|_b (fp16), step
    max|x|_b * max|scale|_b / 127; then dotted with the codes. Same fp32 operations as the kernels."""
    from mobilemoe.quant import unpack_int4
    codes = unpack_int4(q[e]).float()  # [in, out]
    sc = s[e].float()  # [in, G]
    xmax = block_amax(x)
    u = x.float() * scale_to(xmax, 127.0)
    outs = []
    for gidx in range(sc.shape[1]):
        smax = block_amax(sc[:, gidx])
        sn = (sc[:, gidx] * scale_to(smax, 1.0)).half().float()  # stored as fp16 by pack_experts
        a = (u * sn).round().clamp(-127, 127) * ((xmax / 127.0) * smax)
        outs.append(a @ codes[:, 32 * gidx: 32 * (gidx + 1)])
    return torch.cat(outs, dim=-1)


@pytest.mark.parametrize("m,cin", [(1, 160), (5, 544), (67, 160)])
def test_experts_match_reference(isa, m, cin):
    E, cout = 3, 96  # cin=544: 17 blocks = one batched group of 16 + a tail block
    g = torch.Generator().manual_seed(m)
    w = torch.randn(E, cin, cout, generator=g)
    w[1, 3, :32] = 0  # zero group
    q, s = quantize(w)
    assert (s < 0).any() and (s == 0).any()
    pe = K.PackedExperts.from_quantized(q, s)
    x = torch.randn(m, cin, generator=g)
    x[0, 32:64] = 0  # a zero activation block
    for e in range(E):
        y = pe(x, e)
        exact = expert_q8_reference(q, s, e, x)
        torch.testing.assert_close(y, exact, rtol=1e-4, atol=1e-5 * exact.abs().max().item())
        assert rel_err(y, R.expert_ref(q, s, e, x)) < 0.015


def make_moe(E: int, H: int, I: int, S: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    gu = quantize(torch.randn(E, H, 2 * I, generator=g) * 0.05)
    dn = quantize(torch.randn(E, I, H, generator=g) * 0.05)
    shared = tuple(quantize(torch.randn(*shape, generator=g) * 0.05) for shape in [(S, H), (S, H), (H, S)]) if S else None
    return gu, dn, shared


@pytest.mark.parametrize("T", [1, 67])
@pytest.mark.parametrize("with_shared", [True, False])
def test_moe_matches_reference(isa, T, with_shared):
    E, H, I, S, k = 6, 160, 96, 64, 2
    gu, dn, shared = make_moe(E, H, I, S if with_shared else 0, seed=T)
    moe = K.PackedMoE.from_quantized(gu, dn, shared)
    g = torch.Generator().manual_seed(T + 1)
    x = torch.randn(T, H, generator=g)
    # top-k over experts 0..E-2: expert E-1 is chosen by no token
    ids = torch.stack([torch.randperm(E - 1, generator=g)[:k] for _ in range(T)])
    w = torch.rand(T, k, generator=g)
    y = moe(x, ids, w)
    ref = R.moe_ref(x, ids, w, gu, dn, shared)
    assert y.shape == (T, H)
    assert rel_err(y, ref) < 0.025
    # per token too (no token may be badly off)
    per_tok = (y - ref).norm(dim=-1) / ref.norm(dim=-1)
    assert per_tok.max() < 0.05
    # the fused op agrees with composing the single-expert kernels
    composed = torch.zeros_like(x)
    pe_gu, pe_dn = moe.gate_up, moe.down
    for t in range(T):
        for j in range(k):
            gg, uu = pe_gu(x[t: t + 1], int(ids[t, j])).chunk(2, dim=-1)
            composed[t] += w[t, j] * pe_dn(F.silu(gg) * uu, int(ids[t, j]))[0]
    if shared is not None:
        composed += moe.shared(x)
    torch.testing.assert_close(y, composed, rtol=1e-3, atol=1e-3 * composed.abs().max().item())


def test_moe_decode_k1_and_batch_shape(isa):
    E, H, I, S = 4, 64, 32, 32
    gu, dn, shared = make_moe(E, H, I, S, seed=5)
    moe = K.PackedMoE.from_quantized(gu, dn, shared)
    x = torch.randn(1, 1, H)
    ids = torch.tensor([[[2]]])
    w = torch.tensor([[[0.7]]])
    y = moe(x, ids, w)
    assert y.shape == (1, 1, H)
    ref = R.moe_ref(x[0], ids[0], w[0], gu, dn, shared)
    assert rel_err(y[0], ref) < 0.025


def test_isas_agree_with_each_other():
    isas = K.available_isas()
    E, H, I, S, T, k = 5, 96, 64, 64, 9, 2
    gu, dn, shared = make_moe(E, H, I, S, seed=9)
    moe = K.PackedMoE.from_quantized(gu, dn, shared)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    w = torch.rand(T, k, generator=g)
    q, s = make_linear(80, 96, seed=2)
    pl = K.PackedLinear.from_quantized(q, s)
    outs = {}
    try:
        for name in isas:
            K.set_isa(name)
            outs[name] = (moe(x, ids, w), pl(x))
    finally:
        K.set_isa(None)
    base = outs["portable"]
    for name, (ym, yl) in outs.items():
        torch.testing.assert_close(yl, base[1], rtol=1e-4, atol=1e-5 * base[1].abs().max().item())
        torch.testing.assert_close(ym, base[0], rtol=1e-3, atol=1e-3 * base[0].abs().max().item())


def test_env_var_forces_isa(monkeypatch):
    """MOBILEMOE_KERNEL_ISA is read at the first kernel call and again after set_isa(None)."""
    monkeypatch.setenv("MOBILEMOE_KERNEL_ISA", "portable")
    K.set_isa(None)
    assert K.active_isa() == "portable"
    q, s = make_linear(32, 64, seed=4)
    x = torch.randn(2, 64)
    torch.testing.assert_close(K.PackedLinear.from_quantized(q, s)(x), R.linear_ref(q, s, q8_roundtrip(x)),
                               rtol=1e-4, atol=1e-4)
    monkeypatch.setenv("MOBILEMOE_KERNEL_ISA", "nonsense")
    assert K.active_isa() == "portable"  # the decision is cached until set_isa drops it
    K.set_isa(None)
    with pytest.raises(RuntimeError, match="unknown ISA 'nonsense'"):
        K.PackedLinear.from_quantized(q, s)(x)
    monkeypatch.delenv("MOBILEMOE_KERNEL_ISA")
    K.set_isa(None)
    assert K.active_isa() == K.available_isas()[0]


def test_env_var_in_fresh_process():
    code = ("from mobilemoe import kernels as K; import torch; from mobilemoe.quant import quantize;"
            "q,s=quantize(torch.randn(32,64)); K.PackedLinear.from_quantized(q,s)(torch.randn(1,64));"
            "print(K.active_isa())")
    env = dict(os.environ, MOBILEMOE_KERNEL_ISA="avx2" if "avx2" in K.available_isas() else "portable")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == env["MOBILEMOE_KERNEL_ISA"]


def test_packing_is_lossless():
    """The linear runtime layout holds exactly the original codes and scales (decode it back in PyTorch)."""
    from mobilemoe.kernels.pack import linear_tile_stride
    q, s = make_linear(40, 96, seed=6)
    packed = K.pack_linear(q, s)
    n, k = 40, 96
    nkb = k // 32
    assert packed.shape == (3, linear_tile_stride(k)) and packed.shape[1] % 64 == 0
    codes = packed[:, : nkb * 256].reshape(3, nkb, 4, 16, 4)  # tile, block, chunk, row, kk
    lo = (codes & 0xF).to(torch.int16) - 8
    hi = (codes >> 4).to(torch.int16) - 8
    both = torch.stack([lo, hi], dim=3)  # tile, block, chunk, half, row, kk
    full = both.permute(0, 4, 1, 2, 3, 5).reshape(48, k)[:n]
    scales = packed[:, nkb * 256: nkb * 256 + nkb * 32].contiguous().view(torch.float16).reshape(3, nkb, 16)
    scales = scales.transpose(1, 2).reshape(48, nkb)[:n]
    deq = (full.float().unflatten(-1, (-1, 32)) * scales.float().unsqueeze(-1)).flatten(-2)
    assert torch.equal(deq, dequantize(q, s))


def test_expert_scale_rows_hold_the_scales():
    """pack_experts' scale row (e, g) is [sn | smax]: smax the exact block maxima of the checkpoint
    scales, sn * smax gives the scales back to fp16 rounding (an all-zero block stays zero)."""
    E, cin, cout = 2, 96, 64
    g = torch.Generator().manual_seed(11)
    q = torch.randint(0, 256, (E, cin, cout // 2), dtype=torch.uint8, generator=g)
    s = (torch.rand(E, cin, cout // 32, generator=g) + 0.01).half()
    s[1, 32:64, 0] = 0  # one all-zero input block of expert 1, group 0
    _, rows = K.pack_experts(q, s)
    assert rows.shape == (E, cout // 32, cin + cin // 32) and rows.dtype == torch.float16
    want = s.transpose(1, 2).float()  # [E, G, in]
    smax = rows[..., cin:].float()
    assert torch.equal(smax, want.unflatten(-1, (-1, 32)).abs().amax(-1))
    back = (rows[..., :cin].float().unflatten(-1, (-1, 32)) * smax.unsqueeze(-1)).flatten(-2)
    assert torch.allclose(back, want, rtol=2 ** -10, atol=0)
    assert torch.all(rows[1, 0, 32:64] == 0)


def test_bad_inputs_raise():
    q, s = make_linear(32, 64, seed=7)
    pl = K.PackedLinear.from_quantized(q, s)
    with pytest.raises(ValueError):
        pl(torch.randn(2, 32))
    with pytest.raises(ValueError):
        K.PackedLinear.from_quantized(q[:, :15], s)  # in = 30, not a multiple of 32
    E, H, I = 2, 64, 32
    gu, dn, _ = make_moe(E, H, I, 0, seed=1)
    moe = K.PackedMoE.from_quantized(gu, dn)
    with pytest.raises(RuntimeError, match="out of range"):
        moe(torch.randn(1, H), torch.tensor([[E]]), torch.ones(1, 1))
    with pytest.raises(RuntimeError, match="support|unknown"):
        K.set_isa("sse9")


def test_unavailable_extension_raises_clearly(monkeypatch):
    q, s = make_linear(32, 64, seed=8)
    pl = K.PackedLinear.from_quantized(q, s)
    monkeypatch.setattr(K, "_C", None)
    monkeypatch.setattr(K, "_IMPORT_ERROR", ImportError("simulated"))
    assert not K.is_available()
    with pytest.raises(K.KernelsUnavailableError, match="not built"):
        pl(torch.randn(1, 64))


@pytest.mark.parametrize("threading", ["pool", "omp"])
def test_threading_is_deterministic(monkeypatch, threading):
    """Large enough calls go parallel; every output is computed by exactly one job, so any thread
    count / threading mode gives bitwise the same result."""
    if threading == "omp":  # at::parallel_for (OpenMP)
        monkeypatch.setenv("MOBILEMOE_KERNEL_THREADING", "omp")
    else:  # default: the kernels' job pool
        monkeypatch.delenv("MOBILEMOE_KERNEL_THREADING", raising=False)
    q, s = make_linear(2048, 1024, seed=11, zero_groups=False)  # > 1 MB of work: parallel path
    pl = K.PackedLinear.from_quantized(q, s)
    E, H, I, S, T, k = 8, 512, 256, 512, 40, 2
    gu, dn, shared = make_moe(E, H, I, S, seed=12)
    moe = K.PackedMoE.from_quantized(gu, dn, shared)
    g = torch.Generator().manual_seed(13)
    xs = [torch.randn(m, 1024, generator=g) for m in (1, 8, 150)]
    xm = [torch.randn(t, H, generator=g) for t in (1, T)]
    ids = [torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(x.shape[0])]) for x in xm]
    ws = [torch.rand(x.shape[0], k, generator=g) for x in xm]
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ref_l = [pl(x) for x in xs]
        ref_m = [moe(x, i, w) for x, i, w in zip(xm, ids, ws)]
        ref_e = moe.gate_up(xm[1], 3)
        for threads in (2, 3):  # 3 > cores here: a late worker's segment gets stolen
            torch.set_num_threads(threads)
            for _ in range(10):
                for x, r in zip(xs, ref_l):
                    assert torch.equal(pl(x), r)
                for x, i, w, r in zip(xm, ids, ws, ref_m):
                    assert torch.equal(moe(x, i, w), r)
                assert torch.equal(moe.gate_up(xm[1], 3), ref_e)
    finally:
        torch.set_num_threads(old)
    assert rel_err(ref_l[2], R.linear_ref(q, s, xs[2])) < 0.015


FORK_SCRIPT = """
import os, torch
torch.set_num_threads(2)
from mobilemoe import kernels as K
pl = K.PackedLinear.from_quantized(torch.randint(0, 256, (2048, 512), dtype=torch.uint8),
                                   torch.rand(2048, 32).half())
x = torch.randn(8, 1024)
y = pl(x)  # the parent starts the job pool's helper thread
pid = os.fork()
if pid == 0:  # only our kernels in the child (GNU OpenMP itself is not fork-safe)
    os._exit(0 if torch.equal(pl(x), y) and torch.equal(pl(x), y) else 3)
_, status = os.waitpid(pid, 0)
raise SystemExit(os.waitstatus_to_exitcode(status))
"""


def test_job_pool_survives_fork():
    """A fork()ed child gets a fresh job pool (the parent's helper threads do not exist there)."""
    env = {k: v for k, v in os.environ.items() if k != "MOBILEMOE_KERNEL_THREADING"}
    out = subprocess.run([sys.executable, "-c", FORK_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("head_dim", [16, 32, 48, 64])
@pytest.mark.parametrize("group", [1, 3, 5, 8])
def test_decode_attention_kernel_matches_softmax_reference(head_dim, group):
    """The native model's decode attention (one KV head, `group` query heads, fp16 cache) equals
    softmax(q k^T / sqrt(D)) v on the picked path (AVX-512 instance per (group, D)) and the portable one,
    over key counts around the 16-lane tail and the 32-key prefetch distance."""
    g = torch.Generator().manual_seed(head_dim * 10 + group)
    for keys in (1, 17, 40, 300):
        q = torch.randn(group, head_dim, generator=g)
        k = torch.randn(keys, head_dim, generator=g).half()
        v = torch.randn(keys, head_dim, generator=g).half()
        want = torch.softmax(q @ k.float().T / head_dim**0.5, dim=-1) @ v.float()
        for portable in (False, True):
            got = K._lib().attend_kv_head(q, k, v, portable)
            assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (keys, portable, (got - want).abs().max())


def test_decode_attention_kernel_rejects_bad_shapes():
    q = torch.randn(2, 16)
    with pytest.raises(RuntimeError, match=r"k and v must be contiguous float16 \[S, D\]"):
        K._lib().attend_kv_head(q, torch.randn(4, 16), torch.randn(4, 16))


def _causal_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: int, start: int,
                      bf16_inputs: bool = False) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v in float64 with query position start + t seeing keys 0..start+t;
    bf16_inputs: q / sqrt(D), k and v rounded to bf16 first, as the bf16 kernel reads them."""
    T, D = q.shape[0], k.shape[1]
    qh = q.view(T, group, D).transpose(0, 1) / D**0.5
    kk, vv = k.float(), v.float()
    if bf16_inputs:
        qh, kk, vv = qh.bfloat16(), kk.bfloat16(), vv.bfloat16()
    s = qh.double() @ kk.double().T
    allowed = torch.arange(start + T)[None, :] <= torch.arange(start, start + T)[:, None]
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)
    return (p @ vv.double()).transpose(0, 1).reshape(T, group * D).float()


# (positions, cached positions before them, query heads per KV head, head_dim): one and several
# query tiles (128 // group positions each), key-block (64) edges, a chunk after a cached prefix.
PREFILL_CASES = [(1, 0, 1, 16), (2, 0, 3, 64), (64, 0, 3, 64), (65, 0, 2, 32), (130, 7, 4, 48),
                 (200, 100, 3, 64), (300, 0, 5, 128), (257, 63, 8, 64)]


@pytest.mark.parametrize("T,start,group,head_dim", PREFILL_CASES)
def test_prefill_attention_matches_causal_reference(T, start, group, head_dim):
    """The native model's prefill attention (one KV head, fp16 cache): the ATen SDPA path equals the
    float64 causal reference to fp32 precision; the AVX-512 BF16 kernel equals the reference computed
    from bf16-rounded q/k/v to ~3 digits (its only other rounding is p to bf16) and the exact reference
    to bf16 precision."""
    q, k, v = _prefill_inputs(T, start, group, head_dim)
    want = _causal_reference(q, k, v, group, start)
    sdpa = K._lib().prefill_attend_kv_head(q, k, v, group, start, False)
    assert torch.allclose(sdpa, want, atol=1e-5, rtol=1e-4), (sdpa - want).abs().max()
    if not K._lib().prefill_bf16_available(head_dim):
        pytest.skip("no AVX-512 BF16 on this CPU")
    got = K._lib().prefill_attend_kv_head(q, k, v, group, start, True)
    want_bf16 = _causal_reference(q, k, v, group, start, bf16_inputs=True)
    assert (got - want_bf16).abs().max() < 6e-3, (got - want_bf16).abs().max()
    assert (got - want).abs().max() < 3e-2, (got - want).abs().max()


def _prefill_inputs(T, start, group, head_dim):
    g = torch.Generator().manual_seed(T * 7 + start + group)
    q = torch.randn(T, group * head_dim, generator=g)
    k = torch.randn(start + T, head_dim, generator=g).half()
    v = torch.randn(start + T, head_dim, generator=g).half()
    return q, k, v


@pytest.mark.parametrize("T,start,group,head_dim", [c for c in PREFILL_CASES if c[3] in (32, 64, 128)])
def test_amx_prefill_attention_equals_the_bf16_kernel(T, start, group, head_dim):
    """ISA amx runs prefill attention on AMX-BF16 tiles from the same packed bf16 K/V with the same
    roundings (q / sqrt(D), p to bf16): only the fp32 summation order differs from the vdpbf16ps
    kernel (ISA avx512), so the two agree far closer than either does with the fp64 reference."""
    _amx_or_skip()
    q, k, v = _prefill_inputs(T, start, group, head_dim)
    try:
        K.set_isa("avx512")
        vdp = K._lib().prefill_attend_kv_head(q, k, v, group, start, True)
        K.set_isa("amx")
        assert K._lib().prefill_amx_available(head_dim)
        amx = K._lib().prefill_attend_kv_head(q, k, v, group, start, True)
    finally:
        K.set_isa(None)
    want_bf16 = _causal_reference(q, k, v, group, start, bf16_inputs=True)
    # Summation order alone moves an output by ~1e-7; where it moves a score across a bf16 rounding
    # step of its probability p (one bf16 ulp, <= 2^-8 p), that key's share of the output moves by
    # that much: measured 0-0.75% of outputs above 1e-6, worst 5.6e-4 (T=257, G=8).
    diff = (amx - vdp).abs().flatten()
    assert diff.quantile(0.99) < 1e-6 and diff.max() < 2e-3, (diff.quantile(0.99), diff.max())
    assert (amx - want_bf16).abs().max() < 6e-3, (amx - want_bf16).abs().max()


def test_prefill_attention_rejects_bad_shapes():
    q = torch.randn(3, 32)
    with pytest.raises(RuntimeError, match=r"k and v must be contiguous float16 \[start\+T, D\]"):
        K._lib().prefill_attend_kv_head(q, torch.randn(3, 16).half(), torch.randn(3, 16).half(), 2, 1, False)
    with pytest.raises(RuntimeError, match=r"not available for D=24"):
        K._lib().prefill_attend_kv_head(torch.randn(3, 48), torch.randn(3, 24).half(), torch.randn(3, 24).half(),
                                        2, 0, True)


def _amx_or_skip():
    if "amx" not in K.available_isas():
        pytest.skip("this CPU (or its OS) does not run the AMX kernels")


@pytest.mark.parametrize("n,k,m", [(200, 288, 20), (160, 288, 67), (96, 1056, 300), (2000, 64, 130)])
def test_amx_prefill_linear_within_its_bound(n, k, m):
    """AMX's prefill linear (bf16 tiles on the int8 activations, wide calls) against the int8 math
    in double: bf16(q d) and bf16(code w_scale) are off by <= 2^-8 relative each, so every output
    within (2^-7 + 2^-15 + (K + 1) 2^-24 (1 + 2^-6)) * sum_k |q d| |W| (tests/kernels/amx_driver.cpp)."""
    _amx_or_skip()
    q, s = make_linear(n, k, seed=n + k + m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    x[0, :32] = 0
    pl = K.PackedLinear.from_quantized(q, s)
    K.set_isa("amx")
    try:
        y = pl(x)
    finally:
        K.set_isa(None)
    xq, w = q8_roundtrip(x).double(), dequantize(q, s).double()
    exact, mag = xq @ w.T, xq.abs() @ w.abs().T
    bound = (2 ** -7 + 2 ** -15 + (k + 1) * 2 ** -24 * (1 + 2 ** -6)) * mag + 1e-30
    assert ((y.double() - exact).abs() <= bound).all(), ((y.double() - exact).abs() / bound).max()
    assert rel_err(y, R.linear_ref(q, s, x)) < 0.015


@pytest.mark.parametrize("T", [16, 67, 300])
def test_amx_prefill_moe_matches_reference(T):
    """AMX's fused MoE at prefill: an expert chunk of >= prefill_min_m rows runs on bf16 rows (the
    expert scale folded into the weights, no int8 rounding of the activations), a smaller one on the
    int8 path (T = 16: all, 67: some, 300: none); within the int8 path's bounds against the float
    reference, and once every expert is on bf16 rows closer to it than the AVX-512 int8 path."""
    _amx_or_skip()
    E, H, I, S, k = 6, 160, 96, 64, 2
    gu, dn, shared = make_moe(E, H, I, S, seed=T + 100)
    moe = K.PackedMoE.from_quantized(gu, dn, shared)
    g = torch.Generator().manual_seed(T + 101)
    x = torch.randn(T, H, generator=g)
    ids = torch.stack([torch.randperm(E - 1, generator=g)[:k] for _ in range(T)])
    ids[: T // 2, 0] = E - 1  # one expert with many rows, the others with fewer
    w = torch.rand(T, k, generator=g)
    ys = {}
    try:
        for isa in ("amx", "avx512"):
            K.set_isa(isa)
            ys[isa] = moe(x, ids, w)
    finally:
        K.set_isa(None)
    ref = R.moe_ref(x, ids, w, gu, dn, shared)
    y = ys["amx"]
    assert rel_err(y, ref) < 0.025, rel_err(y, ref)
    per_tok = (y - ref).norm(dim=-1) / ref.norm(dim=-1)
    assert per_tok.max() < 0.05, per_tok.max()
    if T == 300:
        assert rel_err(y, ref) < rel_err(ys["avx512"], ref)
