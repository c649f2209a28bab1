"""Aux-loss-free balancing, router z-loss and the Switch load-balancing loss."""

from __future__ import annotations

import torch

from mobilemoe.moe import RouterOutput
from mobilemoe.train import (AuxFreeBalancer, TokenWindowSource, TrainConfig, Trainer, count_spread,
                             load_balancing_loss, router_z_loss)
from mobilemoe.train.balance import moe_blocks

from trainutil import micro_model


def test_z_loss_matches_direct_computation():
    torch.manual_seed(0)
    logits = [torch.randn(10, 8) * 3, torch.randn(10, 8)]
    router = [RouterOutput(logits=l, expert_ids=torch.zeros(10, 2, dtype=torch.long), weights=torch.ones(10, 2))
              for l in logits]
    direct = sum(float((torch.log(torch.exp(l).sum(-1)) ** 2).mean()) for l in logits) / 2
    assert abs(float(router_z_loss(router)) - direct) < 1e-5
    assert float(router_z_loss([])) == 0.0


def test_load_balancing_loss_is_one_when_uniform():
    n, e, k = 8, 4, 2
    logits = torch.zeros(n, e)  # equal scores
    ids = torch.tensor([[0, 1], [2, 3]] * 4)  # every expert chosen equally often
    router = [RouterOutput(logits=logits, expert_ids=ids, weights=torch.ones(n, k))]
    assert abs(float(load_balancing_loss(router)) - 1.0) < 1e-6
    skew = [RouterOutput(logits=torch.tensor([[5.0, 0, 0, 0]] * n), expert_ids=torch.tensor([[0, 1]] * n),
                         weights=torch.ones(n, k))]
    assert float(load_balancing_loss(skew, "softmax")) > 1.5


def test_bias_update_direction():
    model = micro_model(0)
    bal = AuxFreeBalancer(model, rate=0.1)
    n_layers, e = len(bal.blocks), bal.num_experts
    ids = torch.tensor([[0, 1]] * 6 + [[2, 3]] * 2)  # experts 0,1 overloaded; 4..7 idle
    bal.observe([RouterOutput(torch.zeros(8, e), ids, torch.ones(8, 2))] * n_layers)
    bal.step()
    bias = moe_blocks(model)[0].expert_bias
    assert bias[0] < 0 and bias[1] < 0 and bias[4] > 0 and bias[7] > 0
    assert abs(float(bias[0]) + 0.1) < 1e-7
    assert not bias.requires_grad
    assert bal.counts.sum() == 0  # reset after the step


def test_bias_balancing_evens_out_a_skewed_router(text_tokens):
    model = micro_model(0)
    # skew every layer's selection: experts 0 and 1 win for almost every token
    with torch.no_grad():
        for block in moe_blocks(model):
            block.expert_bias[:2] = 0.1
    src = TokenWindowSource(text_tokens, seq_len=32, batch_size=4, seed=0)

    def run(rate: float) -> list[float]:
        torch.manual_seed(0)
        m = micro_model(0)
        m.load_state_dict(model.state_dict())
        cfg = TrainConfig(max_steps=20, lr=0.0, bias_update_rate=rate, z_loss_coef=0.0, progress=False)
        src.load_state_dict({"batches": 0, "seed": 0})
        hist = Trainer(m, cfg, src).fit().history
        spreads = [h["expert_count_spread"] for h in hist]
        return spreads

    balanced, frozen = run(0.01), run(0.0)
    assert frozen[-1] > 0.9 * frozen[0]  # lr 0 and no bias update: stays skewed
    assert balanced[0] > 3.0  # heavily skewed at the start
    late = sum(balanced[-10:]) / 10
    assert late < 0.5 * balanced[0]  # the bias update moves counts towards uniform
    assert late < 0.5 * sum(frozen[-10:]) / 10


def test_frozen_bias_never_in_optimizer():
    from mobilemoe.train import build_optimizer

    model = micro_model(0)
    opt = build_optimizer(model, TrainConfig())
    params = {id(p) for g in opt.param_groups for p in g["params"]}
    for block in moe_blocks(model):
        assert id(block.expert_bias) not in params
    no_decay = opt.param_groups[1]["params"]
    assert all(p.ndim == 1 for p in no_decay) and len(no_decay) > 0
    assert all(p.ndim >= 2 for p in opt.param_groups[0]["params"])


def test_count_spread():
    assert count_spread(torch.tensor([[5, 5, 5, 5]])) == 0.0
    assert count_spread(torch.tensor([[10, 0, 0, 10]])) == 2.0
