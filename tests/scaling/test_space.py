import pytest

from mobilemoe import accounting
from mobilemoe.config import preset
from mobilemoe.scaling.space import Arch, SpaceError, SpaceSpec, arch_from_config, enumerate_space, stats, tier_arch


@pytest.mark.parametrize("name", ["mobilemoe-s", "mobilemoe-m", "mobilemoe-l"])
def test_tiers_are_e8_g8_k1_s4_and_round_trip(name):
    a = tier_arch(name)
    assert (a.E, a.g, a.k, a.s) == (8, 8, 1, 4)
    cfg, ref = a.to_config(), preset(name)
    for f in ("num_local_experts", "num_experts_per_tok", "intermediate_size", "intermediate_size_mlp",
              "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size"):
        assert getattr(cfg, f) == getattr(ref, f), f
    st = stats(a)  # accounting comes from mobilemoe.accounting, unchanged
    assert st.total_params == accounting.total_params(ref)
    assert st.int4_bytes == accounting.weight_bytes(ref, "int4")
    assert st.active_params == pytest.approx(accounting.active_params(ref))


def test_convention_fine_grained_and_shared():
    a = Arch(d_model=512, layers=4, E=4, g=4, k=2, s=2, vocab=1000)
    cfg = a.to_config()
    assert cfg.num_local_experts == 4 * 4 - 2
    assert cfg.num_experts_per_tok == 2 * 4 - 2
    assert cfg.intermediate_size == 4 * 512 // 4
    assert cfg.intermediate_size_mlp == 2 * cfg.intermediate_size and cfg.num_shared_experts == 1
    assert a.e_law == 2.0
    # active FFN width is k * d_ff whatever g and s are: same active params as a g=1 no-shared twin
    twin = Arch(d_model=512, layers=4, E=4, g=1, k=2, s=0, vocab=1000)
    assert stats(a).active_params == pytest.approx(stats(twin).active_params, rel=1e-3)
    dense = Arch(d_model=512, layers=4, E=1, k=1, vocab=1000).to_config()
    assert not dense.is_moe and dense.intermediate_size_mlp == 2048


def test_bad_points_name_the_field():
    with pytest.raises(SpaceError, match="'s'"):
        Arch(d_model=512, layers=4, E=4, g=2, k=1, s=2).check()
    with pytest.raises(SpaceError, match="'E'"):
        Arch(d_model=512, layers=4, E=1, k=2).check()
    with pytest.raises(SpaceError, match="'g'"):
        Arch(d_model=100, layers=4, E=4, g=3).check()


def test_enumerate_small_space_is_valid():
    spec = SpaceSpec(d_models=(256, 512), layer_slack=(0,), experts=(1, 4, 8), top_k=(1, 2), granularity=(1, 8),
                     shared=("none", "half"), vocab=1000)
    archs = list(enumerate_space(spec))
    assert any(a.is_dense for a in archs) and any(a.E == 8 and a.g == 8 and a.s == 4 for a in archs)
    for a in archs:
        a.to_config()
        assert a.int4_ok()


def test_arch_from_dense_config():
    a = arch_from_config(preset("tiny-dense"), ffn_ratio=3)
    assert a.is_dense and a.to_config().intermediate_size_mlp == 384
    with pytest.raises(SpaceError, match="ffn_ratio"):
        arch_from_config(preset("mobilellm-pro-like"), ffn_ratio=4)
