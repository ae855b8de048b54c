"""LoRA through peft."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class LoraOptions:
    """A LoRA adapter on the student.

    Args:
        r: adapter rank.
        alpha: scaling numerator (the update is scaled by alpha / r).
        dropout: dropout on the adapter input.
        target_modules: module names to adapt, or ``all-linear``.
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] | str = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


def apply_lora(model: nn.Module, options: LoraOptions) -> nn.Module:
    """Wrap ``model`` with a fresh LoRA adapter; only the adapter trains."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=options.r,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        target_modules=options.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


# Checkpoints hold the adapter options among the module's hyperparameters: allowlisted, they load back under torch's
# weights-only unpickling (Lightning's default for ``ckpt_path``).
torch.serialization.add_safe_globals([LoraOptions])
