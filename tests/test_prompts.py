"""Prompt templates and their rendering, and fitting a prompt to its budget (``trd_lightning.prompts``)."""

from __future__ import annotations

import pytest
from helpers import chat_ids

from trd_lightning import prompts

PRIVILEGED_HEAD = "Here is a reference solution to this problem:\n"
PRIVILEGED_TAIL = "\n\nNow that you have read the reference solution"


# ---------------------------------------------------------------- templates


def test_render_fills_named_slots_and_keeps_other_braces():
    template = "P={problem} S={solution} I={initial} keep {other} and \\boxed{} and {{x}}"
    out = prompts.render(template, problem="1+1", solution="two", initial="2")
    assert out == "P=1+1 S=two I=2 keep {other} and \\boxed{} and {{x}}"


def test_render_default_student_template():
    assert prompts.render(prompts.STUDENT_TEMPLATE, problem="What is 2+3?") == (
        "What is 2+3?\nPlease reason step by step, and put your final answer within \\boxed{}."
    )


def test_render_inserts_field_text_literally():
    # A problem may itself contain a slot name or a regex escape: it is data, never re-substituted.
    out = prompts.render("{problem}|{solution}", problem="see {solution} and \\1 \\g<0>", solution="S")
    assert out == "see {solution} and \\1 \\g<0>|S"


def test_check_template_names_the_missing_slots():
    with pytest.raises(ValueError, match=r"The privileged template must contain \{solution\}"):
        prompts.check_template("{problem} only", {"problem", "solution"}, "privileged")
    with pytest.raises(ValueError, match=r"must contain \{problem\}, \{solution\}"):
        prompts.check_template("no slots, just \\boxed{}", {"problem", "solution"}, "privileged")
    prompts.check_template(prompts.PRIVILEGED_TEMPLATE, {"problem", "solution"}, "privileged")


# ---------------------------------------------------------------- fit_prompt

PROBLEM = "Last digit, left to right: 6 + 4 * 7 - 4 - 5"
SOLUTION = "6 + 4 = 0\n0 * 7 = 0\n0 - 4 = 6\n6 - 5 = 1\nAnswer: \\boxed{1}"


def privileged_text(problem: str, solution: str) -> str:
    return prompts.PRIVILEGED_TEMPLATE.replace("{problem}", problem).replace("{solution}", solution)


def fit_privileged(tok, problem: str, solution: str, budget: int) -> list[int]:
    fields = {"problem": problem, "solution": solution}
    return prompts.fit_prompt(prompts.PRIVILEGED_TEMPLATE, fields, tok, budget, ("solution",))


def test_fit_prompt_cuts_the_tail_of_a_long_solution(tok):
    long_solution = "\n".join(f"step {i}: {SOLUTION}" for i in range(20))
    budget = 120
    assert len(chat_ids(tok, privileged_text(PROBLEM, long_solution))) > 3 * budget  # so a cut is needed

    ids = fit_privileged(tok, PROBLEM, long_solution, budget)
    assert len(ids) <= budget
    text = tok.decode(ids)
    assert PROBLEM in text
    assert text.count(prompts.TRUNCATION_MARKER) == 1
    kept = text.split(PRIVILEGED_HEAD, 1)[1].split(prompts.TRUNCATION_MARKER, 1)[0]
    # The head of the solution survives and its tail is gone.
    assert kept and long_solution.startswith(kept) and len(kept) < len(long_solution)
    assert kept.startswith("step 0: 6 + 4 = 0")
    assert "step 19" not in text
    # The instructions after the solution are never cut.
    assert text.split(prompts.TRUNCATION_MARKER, 1)[1].startswith(PRIVILEGED_TAIL)
    assert text.endswith("within \\boxed{}.<|im_end|>\n<|im_start|>assistant\n")


def test_fit_prompt_that_fits_is_the_plain_encoding(tok):
    expected = chat_ids(tok, privileged_text(PROBLEM, SOLUTION))
    for budget in (1024, len(expected)):  # well within, and exactly at the budget
        ids = fit_privileged(tok, PROBLEM, SOLUTION, budget)
        assert ids == expected
        assert prompts.TRUNCATION_MARKER not in tok.decode(ids)


def test_fit_prompt_one_token_short_cuts_the_solution(tok):
    expected = chat_ids(tok, privileged_text(PROBLEM, SOLUTION))
    ids = fit_privileged(tok, PROBLEM, SOLUTION, len(expected) - 1)
    assert len(ids) <= len(expected) - 1
    assert prompts.TRUNCATION_MARKER in tok.decode(ids)


def test_fit_prompt_never_cuts_the_problem(tok):
    long_problem = " ".join([PROBLEM] * 30)
    with pytest.raises(ValueError, match="the problem and the instructions are never cut"):
        fit_privileged(tok, long_problem, SOLUTION, 120)


def test_fit_prompt_floor_is_the_template_with_the_marker(tok):
    # The smallest prompt fit_prompt can make is the template with the marker as the whole solution: one
    # token below it is an error, at it a prompt comes back.
    floor = len(chat_ids(tok, privileged_text(PROBLEM, prompts.TRUNCATION_MARKER)))
    long_solution = SOLUTION * 10
    with pytest.raises(ValueError, match="never cut"):
        fit_privileged(tok, PROBLEM, long_solution, floor - 1)
    ids = fit_privileged(tok, PROBLEM, long_solution, floor)
    assert len(ids) <= floor
    assert PROBLEM in tok.decode(ids)
