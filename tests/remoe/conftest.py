import pytest
import torch

from mobilemoe.checkpoint import save_checkpoint
from mobilemoe.config import preset
from mobilemoe.model import MobileMoEForCausalLM


def tiny_cfg(**kw):
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=32, intermediate_size_mlp=32, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=128,
                num_local_experts=8, num_experts_per_tok=2)
    base.update(kw)
    return preset("tiny-moe", **base)


@pytest.fixture
def mobilemoe_dir(tmp_path):
    """A tiny random MobileMoE checkpoint (sigmoid router, shared expert, bf16 on disk, one dense layer)."""
    torch.manual_seed(0)
    cfg = tiny_cfg(num_hidden_layers=3, interleave_moe_layer_step=1)
    model = MobileMoEForCausalLM(cfg)
    with torch.no_grad():
        for blk in model.model.layers:
            if blk.is_moe:
                blk.feed_forward.router.weight.normal_(0, 0.3)
    d = tmp_path / "mm"
    save_checkpoint(model, d, dtype=torch.bfloat16)
    return d


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every ReMoE test runs its tiny matmuls on one thread (tests/conftest.py)."""


TEXT = ("The quick brown fox jumps over the lazy dog. The sky is blue and the grass is green. "
        "Question: what is two plus two? Answer: four. def add(a, b): return a + b\n")


@pytest.fixture
def text_model_dir(tmp_path):
    """A tiny MobileMoE checkpoint with a BPE tokenizer.json (for text --data; the vocabularies match)."""
    from mobilemoe.data.tokenizer import train_bpe

    tok = train_bpe([TEXT] * 20, vocab_size=300)
    torch.manual_seed(0)
    d = tmp_path / "mm-text"
    save_checkpoint(MobileMoEForCausalLM(tiny_cfg(vocab_size=tok.vocab_size)), d)
    tok.save(d)
    return d
