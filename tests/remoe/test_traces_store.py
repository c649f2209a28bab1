"""Routing traces (prefill + generation) and the os.pread expert store on a tiny INT4 checkpoint."""

import numpy as np
import torch

from mobilemoe.remoe.adapters import load_adapter
from mobilemoe.remoe.cache_sim import simulate_layer
from mobilemoe.remoe.device import ExpertStore, write_expert_store
from mobilemoe.remoe.traces import Trace, trace_generation, trace_sequences


def test_trace_roundtrip_and_generation(mobilemoe_dir, tmp_path):
    a = load_adapter(mobilemoe_dir)
    seqs = [torch.randint(0, 64, (1, 10)), torch.randint(0, 64, (1, 6))]
    tr = trace_sequences(a, seqs)
    assert tr.ids.shape == (3, 16, 2) and list(tr.seq_starts) == [0, 10]
    p = tr.save(tmp_path / "t.npz")
    with np.load(p) as z:
        assert z["ids"].dtype == np.uint8
    back = Trace.load(p)
    assert np.array_equal(back.ids, tr.ids) and back.meta["num_experts"] == 8 and back.meta["top_k"] == 2
    gen = trace_generation(a, [seqs[0]], max_new=5)
    assert gen.ids.shape == (3, 15, 2) and gen.phase.tolist() == [0] * 10 + [1] * 5
    # the prompt part of a generation trace equals the prefill trace
    assert np.array_equal(gen.ids[:, :10], tr.ids[:, :10])


def test_expert_store_reads_match_simulation(mobilemoe_dir, tmp_path):
    from mobilemoe.checkpoint import load_tensors
    from mobilemoe.quant.convert import quantize_checkpoint

    q = tmp_path / "int4"
    quantize_checkpoint(mobilemoe_dir, q)
    store_dir = write_expert_store(q, tmp_path / "store")
    cfg, tensors = load_tensors(q)
    a = load_adapter(mobilemoe_dir)
    tr = trace_sequences(a, [torch.randint(0, 64, (1, 20))])
    moe_layers = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    with ExpertStore(store_dir, capacity=3) as store:
        stats = store.replay(tr.ids, moe_layers)
        # LRU per layer with C = 3 gives exactly the simulator's misses
        sim = sum(simulate_layer(tr.ids[l], 3, "lru").misses for l in range(tr.ids.shape[0]))
        assert stats["misses"] == sim and stats["hits"] + stats["misses"] == tr.ids.size
        per_expert = store.index["layers"][str(moe_layers[0])][0]["nbytes"]
        assert stats["bytes_read"] == sim * per_expert and stats["read_seconds"] > 0
        # the bytes read back are the checkpoint's INT4 expert, in the kernels' packed layout
        from mobilemoe.kernels.pack import pack_experts

        got = store.get(moe_layers[0], 5)
        p = f"model.layers.{moe_layers[0]}.feed_forward.experts"
        gu_codes, gu_scales = pack_experts(tensors[f"{p}.gate_up_qweight"][5:6], tensors[f"{p}.gate_up_scale"][5:6])
        dn_codes, dn_scales = pack_experts(tensors[f"{p}.down_qweight"][5:6], tensors[f"{p}.down_scale"][5:6])
        assert torch.equal(got["gu_codes"], gu_codes[0]) and torch.equal(got["gu_scales"], gu_scales[0])
        assert torch.equal(got["dn_codes"], dn_codes[0]) and torch.equal(got["dn_scales"], dn_scales[0])
    with ExpertStore(store_dir, capacity=8, byte_budget=2 * per_expert) as small:
        small.replay(tr.ids, moe_layers)
        assert small.bytes_cached <= 2 * per_expert
