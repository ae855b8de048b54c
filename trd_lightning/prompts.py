"""Prompt templates and their rendering: the student prompt, the OPSD privileged prompt and the refine prompts.

Templates are plain strings with named slots ``{problem}``, ``{solution}`` (the privileged reference) and
``{initial}`` (the student's rollout, for refinement). Only these slots are substituted: any other brace is
left as written, so ``\\boxed{}`` needs no escaping in YAML.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

STUDENT_TEMPLATE = "{problem}\nPlease reason step by step, and put your final answer within \\boxed{}."

PRIVILEGED_TEMPLATE = (
    "{problem}\n\nHere is a reference solution to this problem:\n{solution}\n\n"
    "Now that you have read the reference solution, solve the problem in your own words. "
    "Please reason step by step, and put your final answer within \\boxed{}."
)

REFINE_OPD_TEMPLATE = (
    "Rewrite your solution to the math problem below.\n\n"
    "**Problem:**\n{problem}\n\n"
    "**Your Initial Solution:**\n{initial}\n\n"
    "**Instructions:**\n"
    "1. Keep the overall structure and line of reasoning of your initial solution.\n"
    "2. Find every calculation or logic error and fix it.\n"
    "3. Keep the intermediate steps that are correct and the work that matters.\n"
    "4. Output only the rewritten solution, and put your final answer within \\boxed{}."
)

REFINE_OPSD_TEMPLATE = (
    "Rewrite your solution to the math problem below.\n\n"
    "**Problem:**\n{problem}\n\n"
    "**Reference Solution:**\n{solution}\n\n"
    "**Your Initial Solution:**\n{initial}\n\n"
    "**Instructions:**\n"
    "1. Read the reference solution and understand the method it uses.\n"
    "2. Rewrite your solution so that it agrees with the reference solution.\n"
    "3. Keep the useful parts of your own structure and style where they fit.\n"
    "4. Output only the rewritten solution, and put your final answer within \\boxed{}."
)

REFINE_OPD_CODE_TEMPLATE = (
    "Rewrite your solution to the programming problem below.\n\n"
    "**Problem:**\n{problem}\n\n"
    "**Your Initial Solution:**\n{initial}\n\n"
    "**Instructions:**\n"
    "1. Keep the useful parts of your initial approach.\n"
    "2. Fix every correctness problem, including the edge cases it misses.\n"
    "3. Output only the rewritten solution, as Python code in a single ```python block."
)

REFINE_OPSD_CODE_TEMPLATE = (
    "Rewrite your solution to the programming problem below.\n\n"
    "**Problem:**\n{problem}\n\n"
    "**Reference Solution:**\n{solution}\n\n"
    "**Your Initial Solution:**\n{initial}\n\n"
    "**Instructions:**\n"
    "1. Read the reference solution and understand its approach.\n"
    "2. Fix every correctness problem of your solution, including the edge cases it misses.\n"
    "3. Keep the useful parts of your initial approach where they fit.\n"
    "4. Output only the rewritten solution, as Python code in a single ```python block."
)

# (teacher context, task) -> the refine template a TRD run uses unless one is given.
REFINE_TEMPLATES = {
    ("prompt", "math"): REFINE_OPD_TEMPLATE,
    ("privileged", "math"): REFINE_OPSD_TEMPLATE,
    ("prompt", "code"): REFINE_OPD_CODE_TEMPLATE,
    ("privileged", "code"): REFINE_OPSD_CODE_TEMPLATE,
}

TRUNCATION_MARKER = "\n[... truncated ...]\n"

_SLOT = re.compile(r"\{(problem|solution|initial)\}")


def template_slots(template: str) -> set[str]:
    """The named slots a template uses."""
    return set(_SLOT.findall(template))


def check_template(template: str, required: set[str], name: str) -> None:
    """Raise a ValueError naming the template when it lacks a slot it needs."""
    missing = required - template_slots(template)
    if missing:
        slots = ", ".join("{" + s + "}" for s in sorted(missing))
        raise ValueError(f"The {name} template must contain {slots}; got: {template!r}")


def render(template: str, **fields: str) -> str:
    """Fill the named slots of ``template`` with ``fields``; other braces are kept verbatim."""
    return _SLOT.sub(lambda m: fields[m.group(1)], template)


def to_prompt_ids(
    text: str, tokenizer, use_chat_template: bool, chat_template_kwargs: Mapping | None = None
) -> list[int]:
    """Token ids of a user turn ready for generation: through the chat template when the tokenizer has one."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        encoded = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}],
            add_generation_prompt=True,
            tokenize=True,
            **(chat_template_kwargs or {}),
        )
        # transformers 5 returns a BatchEncoding here, older releases a plain list.
        return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)
    return tokenizer(text, add_special_tokens=True)["input_ids"]


def fit_prompt(
    template: str,
    fields: Mapping[str, str],
    tokenizer,
    max_tokens: int,
    cut_order: tuple[str, ...],
    use_chat_template: bool = True,
    chat_template_kwargs: Mapping | None = None,
) -> list[int]:
    """Render and encode a prompt that fits in ``max_tokens``, cutting the tails of the fields in ``cut_order``.

    Fields are cut one after the other, each from its end, with a visible marker. ``{problem}`` and the
    template's own words are never cut: when the prompt does not fit even with the cuttable fields emptied,
    a ValueError says so.

    Args:
        template: the template to render.
        fields: slot name to text.
        tokenizer: a Hugging Face tokenizer.
        max_tokens: the budget for the whole prompt, chat template included.
        cut_order: the fields that may be cut, first cut first.
        use_chat_template: wrap the text as a user turn when the tokenizer has a chat template.
        chat_template_kwargs: extra arguments for ``apply_chat_template`` (e.g. ``enable_thinking``).
    """

    def encode(values: Mapping[str, str]) -> list[int]:
        return to_prompt_ids(render(template, **values), tokenizer, use_chat_template, chat_template_kwargs)

    fields = dict(fields)
    ids = encode(fields)
    if len(ids) <= max_tokens:
        return ids
    floor = encode({**fields, **{k: TRUNCATION_MARKER for k in cut_order}})
    if len(floor) > max_tokens:
        raise ValueError(
            f"A prompt needs {len(floor)} tokens before any {'/'.join(cut_order) or 'field'} text, over the "
            f"limit of {max_tokens}: the problem and the instructions are never cut. Raise the prompt length "
            "limit or filter long problems out of the dataset."
        )
    for key in cut_order:
        field_ids = tokenizer(fields[key], add_special_tokens=False)["input_ids"]
        lo, hi = 0, len(field_ids)
        # Binary search on how many of the field's tokens to keep: re-encoding joined text is not exactly
        # additive in tokens, so each length is measured, not computed.
        while lo < hi:
            mid = (lo + hi + 1) // 2
            trial = {**fields, key: tokenizer.decode(field_ids[:mid]) + TRUNCATION_MARKER}
            if len(encode(trial)) <= max_tokens:
                lo = mid
            else:
                hi = mid - 1
        fields[key] = tokenizer.decode(field_ids[:lo]) + TRUNCATION_MARKER
        ids = encode(fields)
        if len(ids) <= max_tokens:
            break
    return ids
