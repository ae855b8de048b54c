"""Teacher kinds: a frozen separate model, or the student itself (shared) at initial, live or EMA weights."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Literal

import torch
from torch import nn

TeacherKind = Literal["frozen", "shared"]
SharedWeights = Literal["initial", "live", "ema"]


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no gradients: a teacher never trains and never enters the optimizer."""
    model.eval()
    model.requires_grad_(False)
    return model


def is_peft(model: nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def needs_copy(kind: TeacherKind, weights: SharedWeights, student: nn.Module) -> bool:
    """Whether a shared teacher needs its own copy of the weights.

    ``initial`` with LoRA needs none (the adapter is switched off), ``live`` never does; ``ema`` always does,
    and ``initial`` without LoRA keeps a frozen copy of the starting weights.
    """
    return kind == "shared" and (weights == "ema" or (weights == "initial" and not is_peft(student)))


def frozen_copy(student: nn.Module) -> nn.Module:
    return freeze(copy.deepcopy(student))


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """teacher <- decay * teacher + (1 - decay) * student, over the student's trainable parameters."""
    teacher_params = dict(teacher.named_parameters())
    for name, param in student.named_parameters():
        if param.requires_grad:
            teacher_params[name].lerp_(param.detach().to(teacher_params[name].dtype), 1.0 - decay)


@contextlib.contextmanager
def scorer(
    student: nn.Module, teacher: nn.Module | None, kind: TeacherKind, weights: SharedWeights
) -> Iterator[nn.Module]:
    """The model that scores as teacher, for the duration of the block.

    A shared ``initial`` teacher on a LoRA student is the student with its adapter switched off.
    """
    if kind == "shared" and weights == "live":
        yield student
    elif kind == "shared" and weights == "initial" and is_peft(student):
        with student.disable_adapter():
            yield student
    else:
        yield teacher


def refiner(student: nn.Module, teacher: nn.Module | None, kind: TeacherKind, weights: SharedWeights):
    """The refiner: the frozen model that rewrites rollouts in TRD, as a context manager.

    OPD refines with the frozen teacher. OPSD refines with the initial student (adapter off, or the frozen
    copy); a ``live`` or ``ema`` self-teacher without LoRA keeps no initial weights and refines as it scores.
    """
    return scorer(student, teacher, kind, "initial" if kind == "shared" and is_peft(student) else weights)
