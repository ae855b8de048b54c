"""Learning-rate schedules as pure functions of the step."""

from __future__ import annotations

import math
from collections.abc import Callable


def warmup_cosine(total_steps: int, warmup_ratio: float, min_lr_ratio: float) -> Callable[[int], float]:
    """The multiplier of the peak learning rate at each step: linear warmup, then cosine decay to ``min_lr_ratio``.

    Step ``s`` (0-based) of the warmup uses ``(s + 1) / warmup`` so the very first update is not wasted at 0.
    """
    if not 0 <= warmup_ratio < 1:
        raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}.")
    if not 0 <= min_lr_ratio <= 1:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}.")
    total = max(int(total_steps), 1)
    warmup = int(total * warmup_ratio)

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(total - warmup, 1))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier
