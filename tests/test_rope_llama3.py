"""model.rope_inv_freq's llama3 frequency scaling against transformers' own implementation.

The released MobileMoE configs use the degenerate form (low_freq_factor == high_freq_factor); the
standard Llama 3.1 form (8 / 1 / 4) has a smoothing band between the two wavelengths. Both are
compared with ``transformers.modeling_rope_utils`` on the same settings (no download: a local config).
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from mobilemoe.config import preset
from mobilemoe.model import rope_inv_freq

SCALINGS = {
    "llama3.1": dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192),
    "mobilemoe": preset("mobilemoe-s").rope_scaling,  # low == high
}


@pytest.mark.parametrize("name", list(SCALINGS))
@pytest.mark.parametrize("theta, head_dim", [(500000.0, 64), (10000.0, 128)])
def test_llama3_inv_freq_matches_transformers(name, theta, head_dim):
    scaling = {k: v for k, v in SCALINGS[name].items() if k != "rope_type"}
    cfg = preset("tiny-moe", rope_theta=theta, head_dim=head_dim, rope_scaling={"rope_type": "llama3", **scaling})
    hf = LlamaConfig(hidden_size=cfg.num_attention_heads * head_dim, num_attention_heads=cfg.num_attention_heads,
                     head_dim=head_dim, max_position_embeddings=cfg.max_position_embeddings,
                     rope_parameters={"rope_type": "llama3", "rope_theta": theta, **scaling})
    want, attention_scaling = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    assert attention_scaling == 1.0
    got = rope_inv_freq(cfg)
    torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=0)
    # the band matters: some frequencies are scaled, some kept, (for 3.1) some interpolated
    plain = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    ratio = plain.float() / got
    assert (ratio == 1).any() and torch.isclose(ratio, torch.tensor(scaling["factor"])).any()
