"""Callbacks: the refinement scheduler, rollout samples, validation before the first step, the student's export."""

from trd_lightning.callbacks.export import ExportStudent
from trd_lightning.callbacks.refinement import RefinementScheduler
from trd_lightning.callbacks.samples import RolloutSamples
from trd_lightning.callbacks.validate_start import ValidateAtStart

__all__ = ["ExportStudent", "RefinementScheduler", "RolloutSamples", "ValidateAtStart"]
