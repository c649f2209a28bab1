"""The on-device runtime: INT4 engine, sampling, generation (see :mod:`mobilemoe.runtime.engine`)."""

from mobilemoe.runtime.engine import Engine, GenerationResult
from mobilemoe.runtime.sampling import Sampler, SamplingParams

__all__ = ["Engine", "GenerationResult", "Sampler", "SamplingParams"]
