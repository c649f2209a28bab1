"""Token sampling: greedy, temperature, top-k, top-p (nucleus), seeded for reproducibility."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mobilemoe.errors import MobileMoEError

MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes a uint64


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int = 0

    def __post_init__(self) -> None:
        # NaN passes every comparison and inf makes the distribution uniform: both refused by name
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise MobileMoEError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise MobileMoEError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise MobileMoEError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise MobileMoEError(f"seed must be an integer in [0, 2**64 - 1] (what torch's generator takes), "
                                 f"got {self.seed!r}")


class Sampler:
    """Picks the next token from a logits vector [V]; its own generator makes runs reproducible."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.generator = torch.Generator().manual_seed(params.seed)

    def __call__(self, logits: torch.Tensor) -> int:
        p = self.params
        logits = logits.float().reshape(-1)
        if p.temperature == 0:
            return int(logits.argmax())
        logits = logits / p.temperature
        if p.top_k:
            kth = torch.topk(logits, min(p.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1:
            sorted_logits, order = torch.sort(logits, descending=True)
            cum = torch.softmax(sorted_logits, -1).cumsum(-1)
            drop = cum - torch.softmax(sorted_logits, -1) >= p.top_p  # keep the smallest set reaching top_p
            logits = logits.scatter(0, order[drop], float("-inf"))
        probs = torch.softmax(logits, -1)
        return int(torch.multinomial(probs, 1, generator=self.generator))
