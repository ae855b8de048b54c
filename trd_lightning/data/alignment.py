"""Student and teacher prompts that line up: batched encoding of user turns, and a check made before any row is
tokenized that the response ids will follow the same kind of context on both sides."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning.pytorch.utilities import rank_zero_info

from trd_lightning import prompts

PROBE = {"problem": "What is 1 + 1?", "solution": "1 + 1 = 2, so the answer is 2.", "initial": "1 + 1 = 2"}


def merged_kwargs(base: Mapping[str, Any] | None, override: Mapping[str, Any] | None) -> dict[str, Any]:
    """Chat-template arguments: ``override`` (the teacher's) on top of ``base`` (every prompt's)."""
    return {**(base or {}), **(override or {})}


def encode_user_turns(
    texts: list[str], tokenizer, use_chat_template: bool, chat_template_kwargs: Mapping[str, Any] | None
) -> list[list[int]]:
    """``prompts.to_prompt_ids`` of many texts at once: one batched tokenizer call instead of one per text."""
    if not texts:
        return []
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        encoded = tokenizer.apply_chat_template(
            [[{"role": "user", "content": text}] for text in texts],
            add_generation_prompt=True,
            tokenize=True,
            **(chat_template_kwargs or {}),
        )
        return [list(ids) for ids in (encoded["input_ids"] if hasattr(encoded, "keys") else encoded)]
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]


def check_alignment(
    tokenizer,
    student_template: str,
    teacher_template: str | None,
    use_chat_template: bool,
    chat_template_kwargs: Mapping[str, Any] | None,
    teacher_chat_template_kwargs: Mapping[str, Any] | None,
) -> None:
    """Render a probe prompt for the student and for the teacher, and check what the response ids follow.

    Raises a ValueError naming the fix when a prompt starts with two BOS tokens (a template that writes the BOS
    text while the tokenizer adds its own), when only one side starts with BOS, or when a prompt ends with the
    end-of-sequence token (the response would follow a finished sequence). Prompts that end differently (for
    example a thinking teacher beside a non-thinking student) are allowed, and reported once.

    Args:
        tokenizer: the student's tokenizer (the teacher shares it).
        student_template: the student prompt, with ``{problem}``.
        teacher_template: the privileged teacher prompt, or None when the teacher sees the student prompt.
        use_chat_template: wrap prompts as a user turn when the tokenizer has a chat template.
        chat_template_kwargs: ``apply_chat_template`` arguments of every prompt.
        teacher_chat_template_kwargs: arguments that override those for the teacher's prompt.
    """
    teacher_kwargs = merged_kwargs(chat_template_kwargs, teacher_chat_template_kwargs)
    student = prompts.to_prompt_ids(
        prompts.render(student_template, **PROBE), tokenizer, use_chat_template, chat_template_kwargs
    )
    teacher = prompts.to_prompt_ids(
        prompts.render(teacher_template or student_template, **PROBE), tokenizer, use_chat_template, teacher_kwargs
    )
    options = {"student": "data.student_template", "teacher": "data.privileged_template"}
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    for side, ids in (("student", student), ("teacher", teacher)):
        if bos is not None and ids[:2] == [bos, bos]:
            raise ValueError(
                f"The {side} prompt starts with two BOS tokens ({tokenizer.bos_token!r}): the tokenizer adds one and "
                f"the prompt text brings another. Remove {tokenizer.bos_token!r} from {options[side]} (or from the "
                "chat template)."
            )
        if eos is not None and ids and ids[-1] == eos:
            raise ValueError(
                f"The {side} prompt ends with the end-of-sequence token {tokenizer.eos_token!r}, so every response "
                "would follow a finished sequence: the tokenizer appends it to plain text. Set "
                "data.use_chat_template: true with a tokenizer that has a chat template, or use a tokenizer that "
                "does not add it."
            )
    if bos is not None and (student[:1] == [bos]) != (teacher[:1] == [bos]):
        first, other = ("student", "teacher") if student[:1] == [bos] else ("teacher", "student")
        raise ValueError(
            f"The {first} prompt starts with the BOS token {tokenizer.bos_token!r} and the {other} prompt does not: "
            "both models must read their contexts the same way. Give both prompts the same chat-template settings "
            "for the start of the sequence (data.chat_template_kwargs, data.teacher_chat_template_kwargs)."
        )
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        openings = {
            side: _opening(tokenizer, kw)
            for side, kw in (("student", chat_template_kwargs), ("teacher", teacher_kwargs))
        }
        if openings["student"] != openings["teacher"]:
            # What separate teacher arguments are for (a thinking teacher beside a non-thinking student, say).
            rank_zero_info(
                f"[trd] the response follows the assistant opening {openings['student']!r} in the student's prompt "
                f"and {openings['teacher']!r} in the teacher's (data.teacher_chat_template_kwargs)"
            )


def _opening(tokenizer, kwargs: Mapping[str, Any] | None) -> str:
    """The text the chat template's generation prompt adds after a user turn: what a response follows."""
    turn = [{"role": "user", "content": PROBE["problem"]}]
    bare, opened = (
        tokenizer.apply_chat_template(turn, add_generation_prompt=flag, tokenize=False, **(kwargs or {}))
        for flag in (False, True)
    )
    return opened[len(bare) :] if opened.startswith(bare) else opened
