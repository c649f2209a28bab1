"""The on-device runtime: INT4 engine, sampling, generation (see :mod:`mobilemoe.runtime.engine`)."""

from mobilemoe.runtime.engine import Engine, GenerationResult
from mobilemoe.runtime.offload import ExpertOffload
from mobilemoe.runtime.sampling import Sampler, SamplingParams

__all__ = ["Engine", "ExpertOffload", "GenerationResult", "Sampler", "SamplingParams"]
