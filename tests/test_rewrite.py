"""The rewrite stage: refine prompts within their budget, and how far a rewrite moved its rollout."""

from __future__ import annotations

import pytest

from trd_lightning.hf import load_tokenizer
from trd_lightning.prompts import REFINE_OPSD_TEMPLATE, TRUNCATION_MARKER
from trd_lightning.rollout.rewrite import RefinePrompt, token_edit_distance


def test_refine_prompt_cuts_the_attempt_first_then_the_reference_never_the_problem(tiny):
    tok = load_tokenizer(tiny["student"])
    prompt = RefinePrompt(tok, REFINE_OPSD_TEMPLATE, 10_000, True, None)
    problem, reference, attempt = "PROBLEM 7 + 8", "ref " * 200, "try " * 200
    full = len(prompt.ids(problem, reference, attempt))
    short = len(prompt.ids(problem, reference, "")) + 20
    prompt.max_prompt_length = short
    text = tok.decode(prompt.ids(problem, reference, attempt))
    assert len(prompt.ids(problem, reference, attempt)) <= short < full
    assert problem in text and "ref " * 200 in text  # the reference is whole: only the attempt was cut
    assert text.count(TRUNCATION_MARKER.strip()) == 1 and "try " * 200 not in text
    # Tighter than the reference alone: the attempt goes entirely, then the reference's tail.
    prompt.max_prompt_length = len(prompt.ids(problem, "", "")) + 30
    text = tok.decode(prompt.ids(problem, reference, attempt))
    assert problem in text and "try" not in text and text.count(TRUNCATION_MARKER.strip()) == 2
    prompt.max_prompt_length = 5
    with pytest.raises(ValueError, match="never cut"):
        prompt.ids(problem, reference, attempt)


def test_refine_prompt_takes_its_own_chat_template_arguments(tiny):
    tok = load_tokenizer(tiny["student"])
    plain = RefinePrompt(tok, "{problem} {initial}", 1000, False, None).ids("a", None, "b")
    chat = RefinePrompt(tok, "{problem} {initial}", 1000, True, None).ids("a", None, "b")
    assert plain == tok("a b", add_special_tokens=True)["input_ids"]
    assert tok.decode(chat).startswith("<|im_start|>user\n") and len(chat) > len(plain)


def test_token_edit_distance_by_hand():
    assert token_edit_distance([1, 2, 3], [1, 2, 3]) == 0.0
    assert token_edit_distance([1, 2, 3], [1, 9, 3]) == pytest.approx(1 / 3)  # one substitution
    assert token_edit_distance([1, 2, 3], [1, 2, 3, 4, 5]) == pytest.approx(2 / 5)  # two insertions
    assert token_edit_distance([], [7]) == 1.0
