"""MobileMoE configuration for transformers (``trust_remote_code``), written by ``mobilemoe export hf``.

The fields are the MobileMoE ``config.json`` contract (see the mobilemoe project); nothing here needs
the mobilemoe package.
"""

from transformers import PretrainedConfig


class MobileMoEConfig(PretrainedConfig):
    model_type = "mobilemoe"

    def __init__(self, vocab_size=128256, hidden_size=768, intermediate_size=384, intermediate_size_mlp=1536,
                 num_hidden_layers=20, num_attention_heads=12, num_key_value_heads=4, head_dim=64,
                 hidden_act="silu", max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
                 rope_scaling=None, num_local_experts=60, num_experts_per_tok=4, interleave_moe_layer_step=1,
                 no_rope_layers=None, use_qk_norm=True, tie_word_embeddings=True, attention_bias=False,
                 routed_scaling_factor=2.5, norm_topk_prob=True, attn_temperature_tuning=False,
                 initializer_range=0.02, router_type="sigmoid", num_shared_experts=1, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.intermediate_size_mlp = intermediate_size_mlp
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        # kept under our own name: transformers 5 rewrites ``rope_scaling`` into ``rope_parameters``
        self.mobilemoe_rope_scaling = dict(rope_scaling) if rope_scaling else None
        self.num_local_experts = num_local_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.interleave_moe_layer_step = interleave_moe_layer_step
        self.no_rope_layers = list(no_rope_layers) if no_rope_layers is not None else [1] * num_hidden_layers
        self.use_qk_norm = use_qk_norm
        self.attention_bias = attention_bias
        self.routed_scaling_factor = routed_scaling_factor
        self.norm_topk_prob = norm_topk_prob
        self.attn_temperature_tuning = attn_temperature_tuning
        self.initializer_range = initializer_range
        self.router_type = router_type
        self.num_shared_experts = num_shared_experts
        kwargs.pop("mobilemoe_rope_scaling", None)
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
