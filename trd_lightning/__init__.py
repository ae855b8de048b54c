"""trd-lightning: on-policy distillation (OPD, OPSD) and Trajectory-Refined Distillation on PyTorch Lightning."""

from trd_lightning.callbacks import (
    ExportStudent,
    GradientFragmentationMonitor,
    PrefixFailureMonitor,
    RefinementScheduler,
    RolloutSamples,
    StepProgressBar,
    ValidateAtEnd,
    ValidateAtStart,
)
from trd_lightning.data.datamodule import OnPolicyDataModule
from trd_lightning.lora import LoraOptions
from trd_lightning.module import DistillationModule
from trd_lightning.strategies import FSDP2Strategy

__version__ = "0.1.0"

__all__ = [
    "DistillationModule",
    "ExportStudent",
    "FSDP2Strategy",
    "GradientFragmentationMonitor",
    "LoraOptions",
    "OnPolicyDataModule",
    "PrefixFailureMonitor",
    "RefinementScheduler",
    "RolloutSamples",
    "StepProgressBar",
    "ValidateAtEnd",
    "ValidateAtStart",
    "__version__",
]
