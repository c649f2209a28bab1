"""NativeModel is built from named ModelSpec / LayerSpec fields: misspelt names and wrong tensors are
clear errors, never a silently misread positional argument."""

from __future__ import annotations

import pytest
import torch

from mobilemoe.runtime import native

pytestmark = pytest.mark.skipif(not native.is_available(), reason="mobilemoe._C is not built")


def _lib():
    import mobilemoe.kernels as K

    return K._lib()


def _spec(**over):
    s = _lib().ModelSpec()
    H, D, V, L = 64, 16, 32, 8
    fields = dict(hidden=H, n_heads=4, n_kv_heads=2, head_dim=D, vocab=V, max_len=L,
                  rope_cos=torch.ones(L, D // 2), rope_sin=torch.zeros(L, D // 2),
                  embed_codes=torch.zeros(V, H // 2, dtype=torch.uint8),
                  embed_scales=torch.ones(V, H // 32, dtype=torch.float16),
                  lm_head=torch.zeros(2, 128, dtype=torch.uint8), final_norm=torch.ones(H))
    fields.update(over)
    for k, v in fields.items():
        setattr(s, k, v)
    return s


def test_a_dense_spec_builds():
    assert _lib().NativeModel(_spec()).num_layers() == 0


def test_misspelt_field_is_an_attribute_error():
    with pytest.raises(AttributeError):
        _lib().ModelSpec().hiden = 64
    with pytest.raises(AttributeError):
        _lib().LayerSpec().ffn_witdh = 3


@pytest.mark.parametrize("over, message", [
    (dict(hidden=48), "hidden must be a positive multiple of 32"),
    (dict(n_kv_heads=3), "n_kv_heads dividing"),
    (dict(experts=4), "experts / top_k"),
    (dict(experts=4, top_k=5), "experts / top_k"),
    (dict(rope_cos=torch.ones(4, 8)), r"rope_cos must be float32 \[8, 8\]"),
    (dict(final_norm=torch.ones(64, dtype=torch.float64)), "final_norm must be float32"),
    (dict(embed_scales=torch.ones(32, 2)), "embed_scales must be float16"),
])
def test_bad_model_fields_name_the_field(over, message):
    with pytest.raises(RuntimeError, match=message):
        _lib().NativeModel(_spec(**over))


def test_bad_layer_fields_name_the_field():
    model = _lib().NativeModel(_spec())
    layer = _lib().LayerSpec()
    with pytest.raises(RuntimeError, match="input_norm must be float32"):
        model.add_layer(layer)
    layer.input_norm = layer.post_norm = torch.ones(64)
    layer.qkv = layer.o = torch.zeros(1, 1, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="ffn_width of a dense layer must be positive"):
        model.add_layer(layer)
    layer.moe = True
    with pytest.raises(RuntimeError, match="moe layer in a model with experts = 0"):
        model.add_layer(layer)
