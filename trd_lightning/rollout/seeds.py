"""Every seed of the rollout side comes from one function of (run seed, step, purpose, row identity).

Seeds are per row, keyed by what a row is (its dataset index and its sample number), never by where it sits (its
rank, its micro-batch or chunk of generation), so a step draws the same rollouts whatever the number of processes,
the cap on rows generated at once, or whether a served engine generates them; and a resumed run draws the rollouts
the uninterrupted run would have drawn.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import Tensor


def derive_seed(seed: int, step: int, purpose: str, *keys: int) -> int:
    """A 63-bit seed for ``purpose`` at ``step`` of a run seeded ``seed``; ``keys`` identify the row (or nothing)."""
    text = repr((int(seed), int(step), purpose, tuple(int(k) for k in keys)))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def row_seeds(seed: int, step: int, purpose: str, index: Sequence[int] | Tensor, repeats: int = 1) -> list[int]:
    """One seed per row of ``index`` repeated ``repeats`` times (sample g of row i is keyed ``(i, g)``)."""
    index = index.tolist() if isinstance(index, Tensor) else list(index)
    return [derive_seed(seed, step, purpose, i, g) for i in index for g in range(repeats)]


def uniforms(seeds: Sequence[int], count: int, device=None) -> Tensor:
    """[len(seeds), count] uniform numbers in [0, 1): row r is drawn from its own generator seeded ``seeds[r]``."""
    rows = [torch.rand(count, generator=torch.Generator().manual_seed(s), dtype=torch.float64) for s in seeds]
    out = torch.stack(rows) if rows else torch.zeros((0, count), dtype=torch.float64)
    return out.to(device)
