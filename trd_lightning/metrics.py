"""Sampling metrics over k answers per prompt: avg@k and the unbiased pass@k of Chen et al. (2021).

Both keep per-prompt sums in float64 ``"sum"`` states, so ``compute()`` after a distributed sync, or after
``merge_state``, equals the value one process would get from all prompts, whatever the split across ranks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one prompt: the chance that ``k`` of its ``n`` samples, drawn without replacement, hold a hit.

    Equals ``1 - C(n - c, k) / C(n, k)``, computed as ``1 - prod_{i=n-c+1}^{n} (1 - k / i)`` (Chen et al., 2021), whose
    factors lie in (0, 1): no huge binomials, no cancellation between them.

    Args:
        n: Samples drawn for the prompt.
        c: How many of them are correct.
        k: Budget of attempts, ``1 <= k <= n``.

    Returns:
        pass@k in [0, 1]; exactly 1.0 when ``n - c < k`` (every draw of k holds a correct sample).

    Raises:
        ValueError: If ``k`` is outside ``[1, n]`` or ``c`` outside ``[0, n]``.
    """
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n, got k={k} and n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n, got c={c} and n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def _check(correct: Tensor) -> Tensor:
    if correct.ndim != 2:
        raise ValueError(f"expected correct of shape [prompts, samples], got {tuple(correct.shape)}")
    if not ((correct == 0) | (correct == 1)).all():
        raise ValueError("correct must hold only 0/1 or booleans")
    return correct.to(torch.float64)


class AvgAtK(Metric):
    """avg@k: the mean over prompts of each prompt's accuracy over its samples.

    With k samples for every prompt this is total correct / total samples; when batches differ in k, every prompt
    still weighs the same. ``compute()`` before any update gives NaN.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("accuracy_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("prompts", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, correct: Tensor) -> None:
        """Add a batch.

        Args:
            correct: ``[prompts, k]`` of bool or 0/1, one row per prompt, one column per sample.
        """
        correct = _check(correct)
        self.accuracy_sum += correct.mean(-1).sum()
        self.prompts += correct.shape[0]

    def compute(self) -> Tensor:
        """The mean per-prompt accuracy, float64."""
        return self.accuracy_sum / self.prompts


class PassAtK(Metric):
    """Unbiased pass@k (Chen et al., 2021) averaged over prompts, each with ``n >= k`` samples.

    ``compute()`` before any update gives NaN.

    Args:
        k: The attempt budget.
        **kwargs: Passed to :class:`torchmetrics.Metric`.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, k: int, **kwargs) -> None:
        super().__init__(**kwargs)
        if k < 1:
            raise ValueError(f"k must be at least 1, got k={k}")
        self.k = k
        self.add_state("pass_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("prompts", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, correct: Tensor) -> None:
        """Add a batch.

        Args:
            correct: ``[prompts, n]`` of bool or 0/1, one row per prompt, one column per sample.

        Raises:
            ValueError: If ``n < k``, or ``correct`` is not a 2-D 0/1 tensor.
        """
        n = correct.shape[-1] if correct.ndim else 0
        if n < self.k:
            raise ValueError(f"pass@k with k={self.k} needs at least k samples per prompt, got n={n}")
        hits = _check(correct).sum(-1).long().tolist()
        self.pass_sum += sum(pass_at_k(n, c, self.k) for c in hits)
        self.prompts += len(hits)

    def compute(self) -> Tensor:
        """The mean per-prompt pass@k, float64."""
        return self.pass_sum / self.prompts
