import json

import pytest

from mobilemoe.cli import main
from mobilemoe.scaling.law import default_law
from mobilemoe.scaling.planner import GIB, PlanError, plan, plot_frontier
from mobilemoe.scaling.profiles import get_profile
from mobilemoe.scaling.space import SpaceSpec, stats, tier_arch

SMALL = SpaceSpec(d_models=tuple(range(256, 1345, 64)), layer_slack=(-1, 0), experts=(1, 4, 8, 16), top_k=(1,),
                  granularity=(1, 8), shared=("none", "half"))


@pytest.mark.parametrize("memory_gb,flops", [(0.3, None), (0.68, None), (1.2, 1.0e9), (None, 0.8e9)])
def test_planner_respects_every_budget(memory_gb, flops):
    res = plan(memory_gb=memory_gb, flops_per_token=flops, spec=SMALL)
    assert res.ranked and res.law_is_default
    for c in res.ranked + [res.best_dense, res.best_moe]:
        if c is None:
            continue
        if memory_gb is not None:
            assert c.st.int4_bytes <= memory_gb * GIB
        if flops is not None:
            assert c.st.decode_flops_per_token <= flops
    losses = [c.loss for c in res.ranked]
    assert losses == sorted(losses)
    # Pareto: nothing ranked is dominated by another ranked candidate
    for a in res.ranked:
        for b in res.ranked:
            assert not (b.loss < a.loss and b.memory_bytes < a.memory_bytes
                        and b.st.decode_flops_per_token < a.st.decode_flops_per_token)


def test_planner_reproduces_the_s_tier_under_its_budget():
    res = plan(memory_gb=0.68, spec=SMALL)
    best, tier = res.ranked[0].st, stats(tier_arch("mobilemoe-s"))
    assert best.active_params == pytest.approx(tier.active_params, rel=0.10)
    assert best.total_params == pytest.approx(tier.total_params, rel=0.10)
    assert res.best_moe.loss < res.best_dense.loss


def test_impossible_budgets_give_a_clear_message():
    with pytest.raises(PlanError, match=r"no architecture fits 0\.01 GiB: the smallest candidate .* needs 0\.\d+ GiB"):
        plan(memory_gb=0.01, spec=SMALL)
    with pytest.raises(PlanError, match="FLOPs"):
        plan(memory_gb=0.5, flops_per_token=1e3, spec=SMALL)
    with pytest.raises(PlanError, match="memory-gb"):
        plan(memory_gb=-1, spec=SMALL)


def test_cli_impossible_budget_is_one_line(capsys):
    assert main(["plan", "--memory-gb", "0.01", "--experts", "1,8", "--granularity", "8", "--top-k", "1"]) == 2
    err = capsys.readouterr().err
    assert "no architecture fits 0.01 GiB" in err and "Traceback" not in err


def test_device_speed_leave_gb_and_plot(tmp_path):
    dev = get_profile("galaxy-s25")
    res = plan(memory_gb=0.7, device=dev, spec=SMALL, plot_range=1.5)
    top = res.ranked[0]
    assert top.speed["decode_tok_s"] > 0 and top.speed["prefill_tok_s"] > 0
    assert top.speed["decode_bound"] in ("memory", "compute")
    out = tmp_path / "frontier.png"
    plot_frontier(res, str(out))
    assert out.stat().st_size > 1000
    res2 = plan(device=dev, leave_gb=10.5, spec=SMALL)  # 12 GiB phone, 1.5 GiB for the model + KV cache
    assert res2.count_kv
    for c in res2.ranked:
        assert c.st.int4_bytes + c.st.kv_cache_bytes <= 1.5 * GIB


def test_cli_json_says_default_law(capsys):
    assert main(["plan", "--memory-gb", "0.4", "--experts", "1,8", "--granularity", "1,8", "--top-k", "1",
                 "--device", "iphone-16-pro", "--json", "--top", "3"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["law"]["default"] is True and any("DEFAULT" in n for n in data["notes"])
    assert len(data["ranked"]) == 3 and data["ranked"][0]["int4_bytes"] <= 0.4 * GIB
    assert "speed" in data["ranked"][0]
    assert default_law().is_default


def test_tiers_only_answers_the_pm_question(capsys):
    # an 8 GiB phone keeping 4 GiB for everything else: the largest released tier that fits is L
    assert main(["plan", "--tiers-only", "--device", "iphone-16-pro", "--leave-gb", "4", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    rec = [r["tier"] for r in data["tiers"] if r["recommended"]]
    assert rec == ["mobilemoe-l"] and data["counts_kv_cache"]
    assert all(r["memory_gib"] <= 4.0 for r in data["tiers"] if r["fits"])
    assert main(["plan", "--tiers-only", "--memory-gb", "0.5"]) == 2
    assert "no released tier fits 0.50 GiB" in capsys.readouterr().err


def test_tier_comparison_within_ten_percent_of_published_tiers():
    from mobilemoe.scaling.planner import tier_comparison

    spec = SpaceSpec(d_models=tuple(range(512, 1537, 64)), layer_slack=(-1, 0), experts=(1, 4, 6, 8, 12, 16),
                     top_k=(1,), granularity=(4, 8), shared=("half",))
    rows = tier_comparison(spec=spec)
    assert {r["tier"] for r in rows} == {"mobilemoe-s", "mobilemoe-m", "mobilemoe-l"} and len(rows) == 6
    for r in rows:
        assert r["active_ratio"] == pytest.approx(1.0, abs=0.10), r
        assert r["total_ratio"] == pytest.approx(1.0, abs=0.10), r
        assert r["plan_int4_gib"] <= r["budget_gib"]
        assert r["plan_loss"] < r["best_dense_loss"]
