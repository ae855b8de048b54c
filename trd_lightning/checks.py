"""Checks of a run's inputs against each other, made before any weights load; each error names its fix."""

from __future__ import annotations

from trd_lightning.rollout.batch import RolloutSpec


def check_vocabularies(student: str, student_vocab: int, teacher: str, teacher_vocab: int) -> None:
    if student_vocab != teacher_vocab:
        raise ValueError(
            f"Student {student!r} has a vocabulary of {student_vocab} and teacher {teacher!r} one of {teacher_vocab}: "
            "distillation compares them token by token, so pick a teacher that shares the student's tokenizer "
            "and vocabulary size."
        )


def check_module_options(hp) -> None:
    """The module's numeric and loss options (``hp``: its hyperparameters), each error naming the option."""
    if not 0.0 <= hp.beta <= 1.0:
        raise ValueError(f"model.beta must be in [0, 1] (0 forward KL, 1 reverse KL), got {hp.beta}.")
    if hp.loss_temperature <= 0:
        raise ValueError(f"model.loss_temperature must be > 0, got {hp.loss_temperature}.")
    if not 0.0 <= hp.ema_decay < 1.0:
        raise ValueError(f"model.ema_decay must be in [0, 1), got {hp.ema_decay}.")
    for name in ("pointwise_clip", "loss_ratio_clip", "token_clip", "max_grad_norm", "loss_chunk_mib"):
        if hp[name] is not None and not hp[name] > 0:
            raise ValueError(f"model.{name} must be > 0, got {hp[name]}.")
    for name in ("micro_batch_size", "micro_batch_tokens", "loss_chunk_size", "loss_top_k", "topd_window"):
        if hp[name] is not None and hp[name] < 1:
            raise ValueError(f"model.{name} must be at least 1, got {hp[name]}.")
    if hp.loss_implementation == "closed_form" and hp.loss != "jsd":
        raise ValueError(
            "model.loss_implementation: closed_form computes the jsd family only: set model.loss: jsd, or use "
            "loss_implementation: auto."
        )


def check_optimizer(lr: float, weight_decay: float, betas, warmup_ratio: float, min_lr_ratio: float) -> None:
    if not lr > 0:
        raise ValueError(f"model.lr must be > 0, got {lr}.")
    if weight_decay < 0:
        raise ValueError(f"model.weight_decay must be >= 0, got {weight_decay}.")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"model.betas must be two numbers in [0, 1), got {list(betas)}.")
    if not 0 <= warmup_ratio < 1:
        raise ValueError(f"model.warmup_ratio must be in [0, 1), got {warmup_ratio}.")
    if not 0 <= min_lr_ratio <= 1:
        raise ValueError(f"model.min_lr_ratio must be in [0, 1], got {min_lr_ratio}.")


def check_against_data(
    teacher_kind: str, micro_batch_size: int | None, spec: RolloutSpec, positions: int | None
) -> None:
    """The module's settings against what the DataModule will produce.

    Args:
        teacher_kind: the module's ``teacher_kind``.
        micro_batch_size: the module's ``micro_batch_size``, or None when micro-batches are formed by tokens.
        spec: the DataModule's ``spec()``.
        positions: the student's ``max_position_embeddings`` (None when it has no such limit).
    """
    if teacher_kind == "shared" and spec.teacher_context == "prompt":
        raise ValueError(
            "teacher_kind: shared scores with the student itself, so the teacher must see more than the student: "
            "set data.teacher_context: privileged (OPSD), or use teacher_kind: frozen with a teacher model."
        )
    rollouts = spec.rollouts_per_step
    if micro_batch_size is not None and rollouts % micro_batch_size:
        raise ValueError(
            f"model.micro_batch_size={micro_batch_size} does not divide the {rollouts} rollouts of a step "
            "(data.batch_size x data.rollout.num_generations): pick a divisor, or set model.micro_batch_tokens."
        )
    if positions is not None and spec.longest_prompt + spec.max_new_tokens > positions:
        raise ValueError(
            f"The longest prompt ({spec.longest_prompt} tokens) plus data.rollout.max_new_tokens={spec.max_new_tokens} "
            f"exceeds the student's {positions} positions: lower data.rollout.max_new_tokens, "
            "data.prompt.max_prompt_length or data.prompt.max_teacher_prompt_length."
        )
    if spec.refine_tokens is not None and positions is not None and spec.refine_tokens > positions:
        raise ValueError(
            f"data.refine.max_prompt_length plus the refiner's new tokens ({spec.refine_tokens} in all) "
            f"exceeds the student's {positions} positions: lower data.refine.max_prompt_length or "
            "data.refine.max_new_tokens."
        )
