"""Learning-rate schedules: linear warmup, then cosine, linear, WSD (warmup-stable-decay) or constant.

``lr_at(step, ...)`` is a pure function of the optimizer step (0-based), so resuming only needs the
step count, never a scheduler object.
"""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "linear", "wsd", "constant")


def lr_at(step: int, *, peak_lr: float, total_steps: int, warmup_steps: int = 0,
          schedule: str = "cosine", min_lr: float = 0.0, decay_fraction: float = 0.2) -> float:
    """The learning rate for optimizer step ``step`` (0-based) of ``total_steps``.

    * warmup: ``peak_lr * (step + 1) / warmup_steps`` for the first ``warmup_steps`` steps;
    * ``cosine``: half-cosine from ``peak_lr`` to ``min_lr`` over the remaining steps;
    * ``linear``: straight line from ``peak_lr`` to ``min_lr``;
    * ``wsd``: hold ``peak_lr``, then decay linearly to ``min_lr`` over the last
      ``decay_fraction`` of the steps;
    * ``constant``: ``peak_lr`` after warmup.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")
    if warmup_steps > 0 and step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return peak_lr
    total = max(total_steps, warmup_steps + 1)
    if schedule == "wsd":
        decay_steps = max(1, int(round(decay_fraction * total)))
        decay_start = max(warmup_steps, total - decay_steps)
        if step < decay_start:
            return peak_lr
        progress = min(1.0, (step - decay_start + 1) / max(1, total - decay_start))
        return peak_lr + (min_lr - peak_lr) * progress
    # progress in (0, 1]: reaches min_lr exactly at the last step
    progress = min(1.0, (step - warmup_steps + 1) / max(1, total - warmup_steps))
    if schedule == "linear":
        return peak_lr + (min_lr - peak_lr) * progress
    return min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + math.cos(math.pi * progress))
