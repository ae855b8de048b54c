"""The refinement scheduler: how many rollouts TRD refines, and which, as training goes on."""

from __future__ import annotations

import math
from typing import Literal

import lightning as L

from trd_lightning.rollout.selection import RefinementPlan, RefineMode

Schedule = Literal["constant", "linear", "cosine", "step"]


def scheduled_value(
    schedule: Schedule, step: int, total_steps: int, start: float, end: float, num_stairs: int = 4
) -> float:
    """The value of a schedule from ``start`` (step 0) to ``end`` (step ``total_steps`` and after).

    ``constant`` stays at ``start``; ``linear`` and ``cosine`` move smoothly; ``step`` moves in ``num_stairs``
    equal stairs, the first at ``start`` and the last at ``end``.
    """
    progress = min(1.0, max(step, 0) / max(total_steps, 1))
    if schedule == "constant":
        return start
    if schedule == "linear":
        return start + (end - start) * progress
    if schedule == "cosine":
        return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "step":
        stair = min(int(progress * num_stairs), num_stairs - 1)
        return start + (end - start) * stair / (num_stairs - 1)
    raise ValueError(f"Unknown schedule {schedule!r}: use constant, linear, cosine or step.")


class RefinementScheduler(L.Callback):
    """Hands the DataModule, before every step, the share of rollouts TRD refines and how they are chosen.

    The plan reaches the rollout side through one call, ``datamodule.plan_refinement(plan)``; it is a function of
    the step alone, so a resumed run gets the plans of the uninterrupted one.

    Args:
        schedule: ``constant``, ``linear``, ``cosine`` or ``step``, from ``p_start`` to ``p_end``.
        p_start: refinement probability at the first step.
        p_end: refinement probability at ``total_steps``.
        total_steps: the schedule's length in optimizer steps; defaults to ``trainer.max_steps``.
        num_stairs: stairs of the ``step`` schedule (at least 2).
        mode: ``all`` (every drawn rollout, the paper's default), ``incorrect`` (only wrong answers; needs an
            answer column) or ``divergent`` (only rollouts with a token the teacher gives less than
            ``divergence_prob``; our extension).
        divergence_prob: the teacher probability under which a token marks a rollout as divergent.
        min_student_logprob: the support guard: keep ``y_o`` when the student's mean per-token log-prob of
            ``y_r`` falls below this (None turns it off).
    """

    def __init__(
        self,
        schedule: Schedule = "constant",
        p_start: float = 1.0,
        p_end: float = 1.0,
        total_steps: int | None = None,
        num_stairs: int = 4,
        mode: RefineMode = "all",
        divergence_prob: float = 0.05,
        min_student_logprob: float | None = None,
    ) -> None:
        for name, p in (("p_start", p_start), ("p_end", p_end)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"RefinementScheduler.{name} must be in [0, 1], got {p}.")
        if not 0.0 < divergence_prob < 1.0:
            raise ValueError(f"RefinementScheduler.divergence_prob must be in (0, 1), got {divergence_prob}.")
        if num_stairs < 2:
            raise ValueError(f"RefinementScheduler.num_stairs must be at least 2, got {num_stairs}.")
        scheduled_value(schedule, 0, 1, p_start, p_end, num_stairs)  # rejects an unknown schedule now
        RefinementPlan(p_start, mode)  # rejects an unknown mode now
        self.schedule, self.p_start, self.p_end = schedule, p_start, p_end
        self.total_steps, self.num_stairs = total_steps, num_stairs
        self.mode, self.divergence_prob, self.min_student_logprob = mode, divergence_prob, min_student_logprob

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        data = trainer.datamodule
        if stage != "fit" or data is None:
            return
        spec = data.spec()
        if not spec.refines:
            raise ValueError(
                "RefinementScheduler schedules TRD's refinement: set data.refine.enabled: true, or drop the callback."
            )
        if self.mode == "incorrect" and not spec.verifies:
            raise ValueError(
                "RefinementScheduler mode 'incorrect' needs answers: set data.answer_column, or use mode 'all'."
            )

    def plan_at(self, step: int, trainer: L.Trainer) -> RefinementPlan:
        """The plan of optimizer step ``step``."""
        total = self.total_steps or (trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches)
        prob = scheduled_value(self.schedule, step, int(total), self.p_start, self.p_end, self.num_stairs)
        return RefinementPlan(prob, self.mode, math.log(self.divergence_prob), self.min_student_logprob)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        plan = self.plan_at(trainer.global_step, trainer)
        trainer.datamodule.plan_refinement(plan)
        pl_module.log("refine/prob", plan.prob, batch_size=1)
