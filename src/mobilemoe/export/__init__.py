"""Export MobileMoE checkpoints to other runtimes.

* :mod:`mobilemoe.export.hf`: a Hugging Face directory with self-contained remote code
  (``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``), and the reverse import.
* :mod:`mobilemoe.export.gguf`: a GGUF file for llama.cpp (architecture ``exaone-moe``, see that
  module for why), F16 / Q8_0 / Q4_0, plus :func:`mobilemoe.export.gguf.patch_routers`.
* :mod:`mobilemoe.export.executorch`: an ExecuTorch ``.pte`` (torch.export -> XNNPACK, 8da4w).

Every exporter checks first that the target can represent the checkpoint and raises
:class:`ExportError` naming the blocking feature otherwise.
"""

from mobilemoe.export.common import ExportError

__all__ = ["ExportError"]
