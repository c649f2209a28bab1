"""Adapters for each transformers MoE family (tiny random models built offline), and the errors."""

import json

import pytest
import torch

pytest.importorskip("transformers")

from mobilemoe.errors import MobileMoEError  # noqa: E402
from mobilemoe.remoe.adapters import HF_FAMILIES, load_adapter  # noqa: E402
from mobilemoe.remoe.data import batches, token_array  # noqa: E402
from mobilemoe.remoe.losses import LossWeights, router_probs  # noqa: E402
from mobilemoe.remoe.tiny import build_tiny  # noqa: E402
from mobilemoe.remoe.train import RemoeTrainConfig, RemoeTrainer, apply_delta, load_delta  # noqa: E402

FAMILIES = sorted(HF_FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_family_adapter_and_remoe_steps(family, tmp_path):
    src = tmp_path / "src"
    build_tiny(family, src)
    a = load_adapter(src)
    assert a.family == family and a.num_layers == 2 and a.top_k == 2 and a.num_experts == 8
    assert a.scoring == ("sigmoid" if family == "deepseek_v3" else "softmax")
    names = a.router_param_names()
    assert len(names) == 2 and all(n.endswith(".weight") for n in names)
    ids = torch.randint(0, 128, (2, 12))
    fwd = a.forward(ids)
    for i, lr in enumerate(fwd.layers):
        assert lr.logits.shape == (2, 12, 8) and lr.expert_ids.shape == (2, 12, 2)
        assert lr.logits.requires_grad
        assert torch.allclose(lr.logits, lr.ref_logits, atol=1e-5)  # before training: same router
        # the adapter's top-k rule reproduces the module's own choice
        sel = a.select(i, lr.logits.detach().reshape(-1, 8)).sort(-1).values
        assert torch.equal(sel, lr.expert_ids.reshape(-1, 2).sort(-1).values)
        P = router_probs(lr.logits, a.scoring)
        assert torch.allclose(P.sum(-1), torch.ones(2, 12))
    # a few ReMoE steps: only routers change, every other tensor bit-identical
    base_state = {k: v.clone() for k, v in a.model.state_dict().items()}
    cfg = RemoeTrainConfig(steps=2, lr=1e-2, warmup_steps=0, grad_accum=2, batch_size=2, seq_len=16,
                           weights=LossWeights(warm_steps=1))
    res = RemoeTrainer(a, cfg, batches(token_array("random:128", None, "train", 500), 16, 2), tmp_path / "run",
                       progress=False).fit()
    assert res.frozen_identical and res.routers_changed == 2
    after = a.model.state_dict()
    for k, v in base_state.items():
        assert torch.equal(v, after[k]) == (k not in names), k
    # the delta reapplied to the original directory reproduces the trained routers
    delta, meta = load_delta(res.delta_path)
    assert set(delta) == set(names) and meta["family"] == family
    out = apply_delta(src, res.delta_path, tmp_path / "applied")
    b = load_adapter(out)
    for k, v in b.model.state_dict().items():
        assert torch.equal(v, after[k]), k


def test_unsupported_family_error(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    with pytest.raises(MobileMoEError, match=r"model_type='llama'.*LlamaForCausalLM"):
        load_adapter(tmp_path / "llama")
    d = tmp_path / "weird"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "jamba", "architectures": ["JambaForCausalLM"]}))
    with pytest.raises(MobileMoEError, match="jamba"):
        load_adapter(d)
    with pytest.raises(MobileMoEError, match="no config.json"):
        load_adapter(tmp_path)
    with pytest.raises(MobileMoEError, match="not a model directory"):
        load_adapter(tmp_path / "missing")


def test_no_moe_layers_error(tmp_path):
    import transformers as tf

    from mobilemoe.remoe.tiny import COMMON

    cfg = tf.Qwen2MoeConfig(**COMMON, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                            shared_expert_intermediate_size=32, mlp_only_layers=[0, 1])
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "dense")
    with pytest.raises(MobileMoEError, match=r"no MoE router modules found.*qwen2_moe"):
        load_adapter(tmp_path / "dense")


def test_mobilemoe_dense_checkpoint_error(tmp_path):
    from mobilemoe.checkpoint import save_checkpoint
    from mobilemoe.config import preset
    from mobilemoe.model import MobileMoEForCausalLM

    cfg = preset("tiny-dense", vocab_size=32, hidden_size=16, intermediate_size=32, intermediate_size_mlp=32,
                 num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    save_checkpoint(MobileMoEForCausalLM(cfg), tmp_path / "dense")
    with pytest.raises(MobileMoEError, match=r"no MoE router modules found.*mobilemoe"):
        load_adapter(tmp_path / "dense")
