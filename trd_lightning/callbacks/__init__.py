"""Callbacks: rollout samples, validation before the first step, and the student's export."""

from trd_lightning.callbacks.export import ExportStudent
from trd_lightning.callbacks.samples import RolloutSamples
from trd_lightning.callbacks.validate_start import ValidateAtStart

__all__ = ["ExportStudent", "RolloutSamples", "ValidateAtStart"]
