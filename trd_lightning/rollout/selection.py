"""Which rollouts TRD refines at a step: the plan (set by ``RefinementScheduler``) and the choice it makes. Pure."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

RefineMode = Literal["all", "incorrect", "divergent"]


@dataclass(frozen=True)
class RefinementPlan:
    """How much and what to refine at one step.

    Args:
        prob: the probability that a rollout is refined.
        mode: ``all`` (the paper's default), ``incorrect`` (only wrong answers) or ``divergent`` (only rollouts
            with a token the teacher gives a log-prob below ``divergence_logprob``).
        divergence_logprob: the teacher log-prob under which a token makes its rollout divergent.
        min_student_logprob: the support guard: keep ``y_o`` where the student's mean per-token log-prob of
            ``y_r`` is below it (None turns the guard off).
    """

    prob: float = 1.0
    mode: RefineMode = "all"
    divergence_logprob: float = math.log(0.05)
    min_student_logprob: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.prob <= 1.0:
            raise ValueError(f"The refinement probability must be in [0, 1], got {self.prob}.")
        if self.mode not in ("all", "incorrect", "divergent"):
            raise ValueError(f"Unknown refinement mode {self.mode!r}: use 'all', 'incorrect' or 'divergent'.")


def select_for_refinement(
    plan: RefinementPlan,
    draws: torch.Tensor,
    correct: Sequence[bool] | None = None,
    divergent: Sequence[bool] | None = None,
) -> list[bool]:
    """Which rollouts to refine: each is drawn with probability ``plan.prob`` (``draws``: one uniform number per
    rollout, from its own seed); ``mode`` then keeps every drawn rollout (``all``), the wrong ones (``incorrect``,
    needs ``correct``) or the divergent ones (``divergent``, needs ``divergent``)."""
    drawn = (draws < plan.prob).tolist()
    if plan.mode == "all":
        return drawn
    if plan.mode == "incorrect":
        if correct is None:
            raise ValueError("mode 'incorrect' needs answers: set data.answer_column, or use mode 'all'.")
        return [d and not c for d, c in zip(drawn, correct)]
    if divergent is None:
        raise ValueError("mode 'divergent' needs the teacher's log-probs of the rollouts.")
    return [d and v for d, v in zip(drawn, divergent)]
