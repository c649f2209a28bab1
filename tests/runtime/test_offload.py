"""The expert-offloading runtime: experts on storage, C cached per layer, read with preadv."""

import numpy as np
import pytest
import torch

from mobilemoe.accounting import routed_expert_bytes, runtime_expert_bytes
from mobilemoe.errors import MobileMoEError
from mobilemoe.remoe.cache_sim import simulate_layer
from mobilemoe.runtime import Engine, ExpertOffload, native
from mobilemoe.runtime.offload import plan_capacity, resident_bytes

pytestmark = pytest.mark.skipif(not native.is_available(), reason="native kernels not built")


def _ids(n: int, seed: int = 0) -> list[int]:
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("capacity", [4, 6, 16])
def test_offloaded_logits_equal_in_memory_runtime(int4_ckpt, tmp_path, capacity):
    """Same kernels on the same bytes. Token-by-token decoding (one batch of <= K experts per layer)
    gives identical logits at every step. A prefill with more distinct experts than C runs each layer
    in batches of C experts, which only reorders the fp32 sums of expert outputs."""
    full = Engine.load(int4_ckpt, backend="native")
    off = Engine.load(int4_ckpt, offload=ExpertOffload(capacity=capacity, store_dir=tmp_path / "store"))
    ids = _ids(30)
    for pos, t in enumerate(ids):
        assert torch.equal(full.backend.forward([t], pos), off.backend.forward([t], pos))
    a, b = full.backend.forward(ids[:17], 0), off.backend.forward(ids[:17], 0)
    if capacity == 16:
        assert torch.equal(a, b)
    else:
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    st = off.backend.offload_stats()
    assert st["misses"] > 0 and st["bytes_read"] == st["misses"] * runtime_expert_bytes(off.config)
    if capacity == 16:  # everything fits: each expert of each layer is read once at most
        assert st["misses"] <= 16 * off.config.num_hidden_layers


@pytest.mark.parametrize("capacity", [4, 7])
def test_decode_misses_equal_the_lru_simulator(int4_ckpt, tmp_path, capacity):
    """Token-by-token, the runtime's hits and misses are exactly the cache simulator's LRU on the
    routing the runtime itself recorded."""
    engine = Engine.load(int4_ckpt, offload=ExpertOffload(capacity=capacity, store_dir=tmp_path / "store"))
    model = engine.backend.model
    model.set_record_routing(True)
    for pos, t in enumerate(_ids(40, seed=3)):
        engine.backend.forward([t], pos)
    per_call = model.recorded_routing()  # one [1, K] per MoE layer per step, layer-major within a step
    n_layers = sum(engine.config.is_moe_layer(i) for i in range(engine.config.num_hidden_layers))
    trace = np.stack([torch.cat(per_call[l::n_layers]).numpy() for l in range(n_layers)])  # [L, N, K]
    sim = [simulate_layer(trace[l], capacity, "lru") for l in range(n_layers)]
    st = engine.backend.offload_stats()
    assert st["misses"] == sum(s.misses for s in sim)
    assert st["hits"] == sum(s.hits for s in sim)


def test_memory_budget_picks_the_capacity(int4_ckpt, tmp_path):
    from mobilemoe.config import MobileMoEConfig

    cfg = MobileMoEConfig.from_json(int4_ckpt / "config.json")
    base, per_slot = resident_bytes(cfg, 64), 4 * runtime_expert_bytes(cfg)  # 4 MoE layers
    assert runtime_expert_bytes(cfg) == routed_expert_bytes(cfg) + 48  # + fp16 maxima of the scale blocks
    assert plan_capacity(cfg, base + 6 * per_slot + 10, 64) == 6
    assert plan_capacity(cfg, base + 100 * per_slot, 64) == cfg.num_local_experts
    with pytest.raises(MobileMoEError, match="too small.*at least top-k = 4"):
        plan_capacity(cfg, base + 3 * per_slot, 64)
    engine = Engine.load(int4_ckpt, max_seq_len=64,
                         offload=ExpertOffload(max_memory=base + 5 * per_slot, store_dir=tmp_path / "s"))
    assert engine.backend.capacity == 5


def test_bad_offload_requests_are_named(int4_ckpt, tmp_path, make_int4_checkpoint):
    with pytest.raises(MobileMoEError, match="between top-k"):
        Engine.load(int4_ckpt, offload=ExpertOffload(capacity=2, store_dir=tmp_path / "a"))
    with pytest.raises(MobileMoEError, match="exactly one"):
        Engine.load(int4_ckpt, offload=ExpertOffload(store_dir=tmp_path / "b"))
    with pytest.raises(MobileMoEError, match="reference"):
        Engine.load(int4_ckpt, backend="reference", offload=ExpertOffload(capacity=4))
    dense = make_int4_checkpoint("tiny-dense", seed=0)
    with pytest.raises(MobileMoEError, match="no MoE layers"):
        Engine.load(dense, offload=ExpertOffload(capacity=1, store_dir=tmp_path / "c"))
    # a store written for another model is refused, naming the mismatch
    other = make_int4_checkpoint("tiny-moe-softmax", seed=0)
    Engine.load(other, offload=ExpertOffload(capacity=2, store_dir=tmp_path / "other"))
    with pytest.raises(MobileMoEError, match="num_experts 8, but the checkpoint has 16"):
        Engine.load(int4_ckpt, offload=ExpertOffload(capacity=4, store_dir=tmp_path / "other"))


def test_generate_cli_offloads(int4_ckpt, tmp_path, capsys):
    import json

    from mobilemoe.cli import main

    args = ["generate", "--model", str(int4_ckpt), "--prompt-ids", "1,2,3", "--max-new-tokens", "6", "--json"]
    assert main(args) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(args + ["--cache-experts", "4", "--expert-store", str(tmp_path / "st")]) == 0
    off = json.loads(capsys.readouterr().out)
    assert off["ids"] == plain["ids"] and off["offload"]["capacity"] == 4 and off["offload"]["misses"] > 0
    assert main(args + ["--max-memory", "lots"]) == 2
    assert "expected a size like 300MB" in capsys.readouterr().err
    assert main(args + ["--max-memory", "1KB"]) == 2
    assert "too small" in capsys.readouterr().err


def test_store_of_an_older_format_is_rewritten(int4_ckpt, tmp_path):
    """A store an earlier version wrote (other packed layout) is rewritten from the checkpoint; a
    foreign index is reported, not overwritten."""
    import json

    from mobilemoe.config import MobileMoEConfig
    from mobilemoe.runtime.offload import STORE_FORMAT, STORE_INDEX, ensure_store

    cfg = MobileMoEConfig.from_json(int4_ckpt / "config.json")
    d, _ = ensure_store(int4_ckpt, cfg, tmp_path / "s")
    index = json.loads((d / STORE_INDEX).read_text())
    (d / STORE_INDEX).write_text(json.dumps({**index, "format": "mobilemoe-expert-store-v1"}))
    _, fresh = ensure_store(int4_ckpt, cfg, d)
    assert fresh["format"] == STORE_FORMAT
    (d / STORE_INDEX).write_text(json.dumps({**index, "format": "something-else"}))
    with pytest.raises(MobileMoEError, match="format 'something-else'"):
        ensure_store(int4_ckpt, cfg, d)


def _generate(main, capsys, ckpt, *extra) -> list[int]:
    import json

    args = ["generate", "--model", str(ckpt), "--prompt-ids", "5,6,7", "--max-new-tokens", "8", "--json", *extra]
    assert main(args) == 0
    return json.loads(capsys.readouterr().out)["ids"]


def test_corrupted_store_does_not_change_the_tokens(int4_ckpt, tmp_path, capsys):
    """Probe: bytes of experts.bin flipped in place used to change the generated tokens with rc 0."""
    from mobilemoe.cli import main

    plain = _generate(main, capsys, int4_ckpt)
    store = ["--cache-experts", "4", "--expert-store", str(tmp_path / "st")]
    assert _generate(main, capsys, int4_ckpt, *store) == plain
    blob = bytearray((tmp_path / "st" / "experts.bin").read_bytes())
    blob[: len(blob) // 2] = bytes(len(blob) // 2)  # zero the first half of the records
    with open(tmp_path / "st" / "experts.bin", "r+b") as fh:
        fh.write(blob)
    assert _generate(main, capsys, int4_ckpt, *store) == plain


def test_quantize_force_over_an_old_store(tmp_path, capsys):
    """Probe: `quantize --force` into a directory with an old expert-store/ used to leave the stale
    experts in use, so offloaded tokens differed from in-memory ones."""
    from mobilemoe.checkpoint import save_checkpoint
    from mobilemoe.cli import main
    from mobilemoe.config import preset
    from mobilemoe.model import MobileMoEForCausalLM

    for seed in (1, 2):
        model = MobileMoEForCausalLM(preset("tiny-moe", max_position_embeddings=64))
        model.reset_parameters(seed=seed)
        save_checkpoint(model, tmp_path / f"float{seed}")
    out = tmp_path / "int4"
    assert main(["quantize", str(tmp_path / "float1"), str(out)]) == 0
    capsys.readouterr()
    _generate(main, capsys, out, "--cache-experts", "4")  # writes out/expert-store
    assert (out / "expert-store" / "experts.bin").exists()
    assert main(["quantize", str(tmp_path / "float2"), str(out), "--force"]) == 0
    assert "removed the old checkpoint's expert store" in capsys.readouterr().out
    assert not (out / "expert-store" / "experts.bin").exists()
    plain = _generate(main, capsys, out)
    assert _generate(main, capsys, out, "--cache-experts", "4") == plain
