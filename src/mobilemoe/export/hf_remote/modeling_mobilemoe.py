"""MobileMoE for transformers (``trust_remote_code``), written by ``mobilemoe export hf``.

The model is mobilemoe's own: ``model.py`` and ``moe.py`` beside this file are copies of the mobilemoe
package's sources (only ``from mobilemoe.X import`` rewritten to ``from .X import``). This file adds
only the transformers API around them. No KV cache: every call recomputes the whole sequence (slow
but simple ``generate``).
"""

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_mobilemoe import MobileMoEConfig
from .model import MobileMoEForCausalLM as ReferenceLM
from .model import rope_inv_freq


class MobileMoEForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = MobileMoEConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]

    # model.py's forward runs on this module: it reads ``model``, ``lm_head``, ``inv_freq`` and
    # ``config.max_position_embeddings``, which this class has under the same names.
    rope_tables = ReferenceLM.rope_tables
    output_weight = ReferenceLM.output_weight

    def __init__(self, config: MobileMoEConfig):
        super().__init__(config)
        reference = ReferenceLM(config.to_model_config())  # built and initialised by model.py
        # adopted, not wrapped, so the tensor names stay the checkpoint's (model.*, lm_head.weight)
        self.model, self.lm_head = reference.model, reference.lm_head
        self.register_buffer("inv_freq", reference.inv_freq, persistent=False)
        self.post_init()

    def _init_weights(self, module):
        # Weights come from model.py (new model) or the checkpoint (loaded one); only the RoPE table,
        # a non-persistent buffer left empty by meta-device loading, is computed here.
        if module is self:
            with torch.no_grad():
                self.inv_freq.copy_(rope_inv_freq(self.config.to_model_config()))

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("MobileMoE remote code has no padding support: attention_mask must be all ones")
        logits = ReferenceLM.forward(self, input_ids).logits
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size)
        return CausalLMOutputWithPast(loss=loss, logits=logits)
