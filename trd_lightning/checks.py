"""Checks of a run's inputs against each other, made before any weights load; each error names its fix."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def check_vocabularies(student: str, student_vocab: int, teacher: str, teacher_vocab: int) -> None:
    if student_vocab != teacher_vocab:
        raise ValueError(
            f"Student {student!r} has a vocabulary of {student_vocab} and teacher {teacher!r} one of {teacher_vocab}: "
            "distillation compares them token by token, so pick a teacher that shares the student's tokenizer "
            "and vocabulary size."
        )


def check_against_data(
    model: Mapping[str, Any], data: Mapping[str, Any], longest_prompt: int, positions: int | None
) -> None:
    """The module's settings against the DataModule's (both as hyperparameter mappings)."""
    if model["teacher_kind"] == "shared" and data["teacher_context"] == "prompt":
        raise ValueError(
            "teacher_kind: shared scores with the student itself, so the teacher must see more than the student: "
            "set data.teacher_context: privileged (OPSD), or use teacher_kind: frozen with a teacher model."
        )
    rollouts = data["batch_size"] * data["num_generations"]
    if rollouts % model["micro_batch_size"]:
        raise ValueError(
            f"model.micro_batch_size={model['micro_batch_size']} does not divide the {rollouts} rollouts of a step "
            f"(data.batch_size={data['batch_size']} x data.num_generations={data['num_generations']}): pick a divisor."
        )
    if positions is not None and longest_prompt + data["max_new_tokens"] > positions:
        raise ValueError(
            f"The longest prompt ({longest_prompt} tokens) plus data.max_new_tokens={data['max_new_tokens']} "
            f"exceeds the student's {positions} positions: lower data.max_new_tokens, "
            "data.max_prompt_length or data.max_teacher_prompt_length."
        )
    if data.get("refine") and positions is not None:
        refine_tokens = data["max_refine_prompt_length"] + (data["refine_max_new_tokens"] or data["max_new_tokens"])
        if refine_tokens > positions:
            raise ValueError(
                f"data.max_refine_prompt_length={data['max_refine_prompt_length']} plus the refiner's new tokens "
                f"({refine_tokens} in all) exceeds the student's {positions} positions: lower "
                "data.max_refine_prompt_length or data.refine_max_new_tokens."
            )
