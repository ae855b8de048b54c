"""Callbacks: refinement scheduler, diagnostics, rollout samples, validation before the first step, export, and the
optimizer-step progress bar."""

from trd_lightning.callbacks.export import ExportStudent
from trd_lightning.callbacks.fragmentation import GradientFragmentationMonitor
from trd_lightning.callbacks.prefix import PrefixFailureMonitor
from trd_lightning.callbacks.progress import StepProgressBar
from trd_lightning.callbacks.refinement import RefinementScheduler
from trd_lightning.callbacks.samples import RolloutSamples
from trd_lightning.callbacks.validate_start import ValidateAtEnd, ValidateAtStart

__all__ = [
    "ExportStudent",
    "GradientFragmentationMonitor",
    "PrefixFailureMonitor",
    "RefinementScheduler",
    "RolloutSamples",
    "StepProgressBar",
    "ValidateAtEnd",
    "ValidateAtStart",
]
