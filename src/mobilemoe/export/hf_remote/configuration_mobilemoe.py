"""transformers' view of the MobileMoE config (``trust_remote_code``), written by ``mobilemoe export hf``.

The fields, their defaults and their checks are those of the ``MobileMoEConfig`` dataclass in the
``config.py`` shipped beside this file (a copy of mobilemoe's own); this class only carries them
under transformers' ``PretrainedConfig``.
"""

import dataclasses

from transformers import PretrainedConfig

from .config import MobileMoEConfig as ModelConfig

# Contract fields this class stores as plain attributes. transformers owns ``torch_dtype`` (it becomes
# ``dtype``) and ``tie_word_embeddings``; ``rope_scaling`` is kept under our own name because
# transformers 5 rewrites ``rope_scaling`` into ``rope_parameters``.
_HF_OWNED = ("extra", "torch_dtype", "tie_word_embeddings", "rope_scaling")
FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig) if f.name not in _HF_OWNED)


class MobileMoEConfig(PretrainedConfig):
    model_type = ModelConfig.model_type

    def __init__(self, **kwargs):
        ours, theirs = kwargs.pop("mobilemoe_rope_scaling", None), kwargs.pop("rope_scaling", None)
        rope_scaling = ours or theirs  # ours when transformers wrote the file, theirs from mobilemoe
        given = {name: kwargs.pop(name) for name in FIELDS + ("tie_word_embeddings",) if name in kwargs}
        cfg = ModelConfig(rope_scaling=rope_scaling, **given)  # fills the defaults and validates
        for name in FIELDS:
            setattr(self, name, getattr(cfg, name))
        self.mobilemoe_rope_scaling = cfg.rope_scaling
        super().__init__(tie_word_embeddings=cfg.tie_word_embeddings, **kwargs)

    def to_model_config(self) -> ModelConfig:
        """The dataclass that ``model.py`` builds the model from."""
        values = {name: getattr(self, name) for name in FIELDS}
        return ModelConfig(rope_scaling=self.mobilemoe_rope_scaling,
                           tie_word_embeddings=self.tie_word_embeddings, **values)
