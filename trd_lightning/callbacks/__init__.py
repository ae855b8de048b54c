"""Callbacks: rollout samples and the student's export."""

from trd_lightning.callbacks.export import ExportStudent
from trd_lightning.callbacks.samples import RolloutSamples

__all__ = ["ExportStudent", "RolloutSamples"]
