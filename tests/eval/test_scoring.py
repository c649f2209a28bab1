"""Log-likelihood scoring, acc / acc_norm, few-shot prompts, standard errors."""

from __future__ import annotations

import copy
import math
import shutil
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from mobilemoe.eval import EvalLM, LoglikelihoodResult, MCItem, evaluate_mc, fewshot_prefix
from mobilemoe.eval.multiple_choice import stderr_of_mean


def direct(lm: EvalLM, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """Sum of log-softmax of the continuation tokens from one full forward of ctx + cont."""
    full = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = F.log_softmax(lm.model(full).logits.float(), dim=-1)[0]
    rows = logp[len(ctx) - 1:len(ctx) - 1 + len(cont)]
    target = torch.tensor(cont)
    return float(rows.gather(-1, target[:, None]).sum()), bool((rows.argmax(-1) == target).all())


PAIRS = [
    ("Question: What color is the sky?\nAnswer:", " blue"),
    ("Question: What color is the sky?\nAnswer:", " a big yellow thing"),
    ("The quick brown fox jumps over the ", "lazy dog."),  # trailing space moves to the continuation
    ("", "The sky is blue."),  # empty context: scored after the prefix token
    ("Janet has 16 eggs.", " #### 18"),
    ("x", " y"),
]


def test_loglikelihood_equals_direct_computation(tiny_lm):
    results = tiny_lm.loglikelihood(PAIRS)  # batch of 4 with padding + a second batch
    assert len(results) == len(PAIRS)
    for (c, x), res in zip(PAIRS, results):
        ctx, cont = tiny_lm.encode_pair(c, x)
        want, greedy = direct(tiny_lm, ctx, cont)
        assert res.num_tokens == len(cont) > 0
        assert res.logprob == pytest.approx(want, abs=1e-4)
        assert res.is_greedy == greedy


def test_batch_size_does_not_change_scores(tiny_lm):
    a = tiny_lm.loglikelihood(PAIRS)
    old = tiny_lm.batch_size
    try:
        tiny_lm.batch_size = 1
        b = tiny_lm.loglikelihood(PAIRS)
    finally:
        tiny_lm.batch_size = old
    for x, y in zip(a, b):
        assert x.logprob == pytest.approx(y.logprob, abs=1e-4)


def test_shared_input_rows_are_scored_per_target(tiny_lm):
    ctx = tiny_lm.encode_pair("Answer:", " A")[0]
    letters = [tiny_lm.encode(" " + L) for L in "ABCD"]
    res = tiny_lm.loglikelihood_tokens([(ctx, t) for t in letters])
    with torch.no_grad():
        logp = F.log_softmax(tiny_lm.model(torch.tensor([ctx])).logits.float(), -1)[0, -1]
    for t, r in zip(letters, res):
        if len(t) == 1:
            assert r.logprob == pytest.approx(float(logp[t[0]]), abs=1e-5)


def test_encode_pair_and_truncation(tiny_lm):
    ctx, cont = tiny_lm.encode_pair("hello ", "world")
    assert ctx[0] == tiny_lm.prefix_token_id == tiny_lm.tokenizer.eos_id
    assert tiny_lm.tokenizer.decode(ctx[1:]) == "hello"
    assert tiny_lm.tokenizer.decode(cont) == " world"
    # A request longer than max_length is cut from the left; scores equal the truncated window.
    long_ctx = tiny_lm.encode(" ".join(["the quick brown fox"] * 40))
    cont = tiny_lm.encode(" jumps")
    old = tiny_lm.max_length
    try:
        tiny_lm.max_length = 32
        (res,) = tiny_lm.loglikelihood_tokens([([tiny_lm.prefix_token_id] + long_ctx, cont)])
    finally:
        tiny_lm.max_length = old
    window = ([tiny_lm.prefix_token_id] + long_ctx + cont)[:-1][-32:]
    want, _ = direct(tiny_lm, window[:32 - len(cont) + 1], cont)
    assert res.logprob == pytest.approx(want, abs=1e-4)


class FakeLM:
    """Returns fixed log-likelihoods keyed by continuation, to check the metrics exactly."""

    def __init__(self, table: dict[str, float]) -> None:
        self.table = table
        self.requests: list[tuple[str, str]] = []

    def loglikelihood(self, requests, desc=""):
        self.requests += list(requests)
        return [LoglikelihoodResult(self.table[x], False, 1) for _, x in requests]


def item(choices, gold, ctx="Q:"):
    return MCItem([ctx] * len(choices), [" " + c for c in choices], gold, list(choices))


def test_acc_vs_acc_norm_on_hand_made_items():
    fake = FakeLM({" a": -2.0, " bbbbbbbb": -4.0, " cc": -1.0, " dddddd": -3.0})
    items = [
        item(["a", "bbbbbbbb"], gold=1),  # raw: a (-2 > -4); per char: bbbbbbbb (-0.5 > -2)  -> acc 0, norm 1
        item(["cc", "dddddd"], gold=0),  # raw: cc (-1 > -3); per char: -0.5 vs -0.5, a tie -> first (numpy.argmax)
    ]
    res = evaluate_mc(fake, "hand", items)
    assert res.acc == pytest.approx(0.5)
    assert res.acc_norm == pytest.approx(1.0)
    assert res.chance == pytest.approx(0.5)
    assert res.n == 2
    assert res.acc_stderr == pytest.approx(stderr_of_mean([0.0, 1.0]))
    assert res.acc_norm_stderr == 0.0


def test_partial_context_items_score_shared_continuation():
    fake = FakeLM({" got it.": -1.0})
    it = MCItem(["A so Sarah", "A so Maria"], [" got it."] * 2, 1, ["got it."] * 2)
    evaluate_mc(fake, "wino", [it], use_norm=False)
    assert fake.requests == [("A so Sarah", " got it."), ("A so Maria", " got it.")]


def test_fewshot_prefix_is_seeded_and_excludes_the_item():
    pool = [item([f"c{i}", "x"], 0, ctx=f"Q{i}:") for i in range(10)]
    p = fewshot_prefix(pool, 3, 4, seed=7)
    assert p == fewshot_prefix(pool, 3, 4, seed=7)
    assert p != fewshot_prefix(pool, 3, 4, seed=8)
    shots = p.split("\n\n")[:-1]
    assert len(shots) == 4 and "Q3:" not in p
    assert all(s.startswith("Q") and s.endswith(f" c{s[1]}") for s in shots)
    assert fewshot_prefix(pool, 3, 0, seed=7) == ""
    fake = FakeLM({" c0": -1.0, " x": -2.0, **{f" c{i}": -1.0 for i in range(10)}})
    evaluate_mc(fake, "fs", pool, limit=2, shots=2, seed=1)
    assert fake.requests[0][0] == fewshot_prefix(pool, 0, 2, 1) + "Q0:"


def test_stderr_of_mean():
    vals = [1.0, 0.0, 1.0, 1.0]
    mu = 0.75
    assert stderr_of_mean(vals) == pytest.approx(math.sqrt(sum((v - mu) ** 2 for v in vals) / 3 / 4))
    assert stderr_of_mean([1.0]) == 0.0


def test_int4_checkpoint_evaluates(tiny_ckpt, tiny_lm, tmp_path):
    from mobilemoe.eval import load_eval_lm
    from mobilemoe.quant.convert import quantize_checkpoint
    from mobilemoe.quant.qat import qat_weights

    out = tmp_path / "int4"
    quantize_checkpoint(tiny_ckpt, out)
    shutil.copy(tiny_ckpt / "tokenizer.json", out / "tokenizer.json")
    lm4 = load_eval_lm(out, batch_size=4)
    assert lm4.model.model.embed_tokens.weight.dtype == torch.float32  # dequantized, computed in fp32
    got = lm4.loglikelihood(PAIRS[:3])
    ref = tiny_lm.loglikelihood(PAIRS[:3])
    # Exact: the float model with every quantized tensor replaced by dequantize(quantize(w)). This
    # is the check that catches a wrong decode: swapping the two nibbles of each byte permutes the
    # hidden axis of the tied embedding and head alike, which moved this model's scores by 0.3% at most.
    deq = copy.deepcopy(tiny_lm.model)
    deq.load_state_dict({**deq.state_dict(), **qat_weights(deq)})
    for g, (c, x) in zip(got, PAIRS[:3]):
        assert g.logprob == pytest.approx(direct(SimpleNamespace(model=deq), *lm4.encode_pair(c, x))[0], abs=1e-3)
    # Against the float model, a bound on the quantization error itself: INT4 g32 moves these sums
    # by 0.1-0.8% (measured: 0.80%, 0.10%, 0.19% of -53 / -402 / -249 nats); 3% leaves ~4x margin
    # for rounding across machines.
    for g, r in zip(got, ref):
        assert g.num_tokens == r.num_tokens
        assert g.logprob == pytest.approx(r.logprob, rel=0.03)
