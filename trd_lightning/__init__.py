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
from trd_lightning.data.options import CodeOptions, PromptOptions, RefineOptions, RolloutOptions, ValidationOptions
from trd_lightning.lora import LoraOptions
from trd_lightning.module import DistillationModule
from trd_lightning.serve.options import ServiceOptions
from trd_lightning.strategies import FSDP2Strategy
from trd_lightning.verify.sandbox import Limits

__version__ = "0.1.0"

__all__ = [
    "CodeOptions",
    "DistillationModule",
    "ExportStudent",
    "FSDP2Strategy",
    "GradientFragmentationMonitor",
    "Limits",
    "LoraOptions",
    "OnPolicyDataModule",
    "PrefixFailureMonitor",
    "PromptOptions",
    "RefineOptions",
    "RefinementScheduler",
    "RolloutOptions",
    "RolloutSamples",
    "ServiceOptions",
    "StepProgressBar",
    "ValidateAtEnd",
    "ValidateAtStart",
    "ValidationOptions",
    "__version__",
]
