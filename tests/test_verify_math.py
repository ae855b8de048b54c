"""Tests for trd_lightning.verify: answer equivalence judged by hand, and bounded time on any thread."""

from __future__ import annotations

import faulthandler
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import sympy

from trd_lightning.verify import is_correct, parse_answer

# (response, gold, equal?) with the expectation worked out by hand, not read off the verifier.
CASES = [
    # fractions against decimals
    ("\\frac{1}{2}", "0.5", True),
    ("0.5", "\\frac{1}{2}", True),
    ("3/4", "0.75", True),
    ("0.75", "3/4", True),
    ("$-0.5$", "-1/2", True),
    ("\\boxed{0.333333}", "1/3", True),  # math-verify compares floats rounded to 6 decimals
    ("\\boxed{0.3333}", "1/3", False),
    # LaTeX against plain text
    ("$\\sqrt{2}$", "sqrt(2)", True),
    ("\\boxed{sqrt(2)}", "\\sqrt{2}", True),
    ("$2\\pi$", "2*pi", True),
    ("\\boxed{2*pi}", "2\\pi", True),
    ("\\boxed{2 \\cdot \\pi}", "2\\pi", True),
    ("\\boxed{6.28}", "2\\pi", False),
    ("\\boxed{2}", "2\\pi", False),  # a plain parse of the gold would have read 2\pi as 2
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}", True),
    ("$\\sqrt{3}/2$", "\\frac{\\sqrt{3}}{2}", True),
    ("\\boxed{0.8660254}", "\\frac{\\sqrt{3}}{2}", True),
    ("\\boxed{0.866}", "\\frac{\\sqrt{3}}{2}", False),
    ("\\boxed{\\frac{\\sqrt{3}}{3}}", "\\frac{\\sqrt{3}}{2}", False),
    ("\\boxed{x^2+2x+1}", "(x+1)^2", True),
    ("\\boxed{x+1}", "x+2", False),
    ("\\boxed{(1, 2)}", "(1, 2)", True),
    ("\\boxed{2}", "(1, 2)", False),
    # plain final answers
    ("The answer is 42", "42", True),
    ("The answer is 42", "24", False),
    ("Final answer: 3/4", "0.75", True),
    ("0.5", "1/2", True),
    ("We compute 2+2 = 4, then multiply by 3 to get 12.", "12", True),
    # boxed inside longer reasoning
    (
        "Since $a=3$ and $b=4$, $c^2 = 9 + 16 = 25$, so $c = \\boxed{5}$. Indeed 3, 4, 5 is a Pythagorean triple.",
        "5",
        True,
    ),
    (
        "Since $a=3$ and $b=4$, $c^2 = 9 + 16 = 25$, so $c = \\boxed{5}$. Indeed 3, 4, 5 is a Pythagorean triple.",
        "3",
        False,
    ),
    # the last box wins, also where math-verify alone would join nearby boxes into the set {first, last}
    ("\\boxed{1} then \\boxed{2}", "2", True),
    ("\\boxed{1} then \\boxed{2}", "1", False),
    ("Guess: \\boxed{7}. Hmm, wait, I dropped a sign; redoing it gives \\boxed{-7}", "-7", True),
    ("Guess: \\boxed{7}. Hmm, wait, I dropped a sign; redoing it gives \\boxed{-7}", "7", False),
    ("\\boxed{1} and \\boxed{2}", "\\{1, 2\\}", False),
    ("\\boxed{3}" + " Let me double check every step of this." * 5 + " \\boxed{4}", "4", True),
    # wrong or missing answers
    ("\\boxed{1/2}", "0.25", False),
    ("\\boxed{3}", "4", False),
    ("", "3", False),
    ("I could not work it out.", "3", False),
]

# Equal values that are documented not to be read: plain text outside $...$ or a box gives numbers and digit-only
# expressions alone, so the answers below are read as nothing or as the leading 2.
UNREAD = [
    ("The answer is sqrt(2)", "\\sqrt{2}"),
    ("2*pi", "2\\pi"),
    ("The answer is 2\\pi", "2\\pi"),
]


@pytest.mark.parametrize(("response", "gold", "expected"), CASES)
def test_is_correct(response, gold, expected):
    assert is_correct(response, gold) is expected


@pytest.mark.parametrize(("response", "gold"), UNREAD)
def test_plain_text_beyond_numbers_is_not_read(response, gold):
    assert is_correct(response, gold) is False


def test_parse_answer():
    assert parse_answer("So the result is $\\frac{1}{2}$.")[0] == sympy.Rational(1, 2)
    assert parse_answer("\\boxed{1} and \\boxed{2}")[0] == 2
    assert parse_answer("no number at all") == []
    assert parse_answer("") == []


def test_off_the_main_thread():
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda case: is_correct(case[0], case[1]), CASES))
        parsed = pool.submit(parse_answer, "So the result is $\\frac{1}{2}$.").result()
    assert got == [expected for _, _, expected in CASES]
    assert parsed[0] == sympy.Rational(1, 2)


# 9^(9^9) has 370 million digits: sympy computes it in one C call that holds the GIL for minutes, and an unbounded
# parse of 3000 nested parentheses runs well over 30 s.
# Unbounded, sympy spends minutes on this power tower in one C call: far beyond the loose limits below, which only
# need to tell "stopped by the time limit" from "ran to completion" on a loaded machine.
PATHOLOGICAL = "\\boxed{9^{9^{9}}}"


def _bounded(check, capsys) -> tuple[object, float]:
    # A regression would hang with the GIL held, where no Python timer can run: faulthandler's C-level watchdog turns
    # that into a crash, its traceback on the real stderr since pytest's capture would swallow it with the process.
    with capsys.disabled():
        faulthandler.dump_traceback_later(120, exit=True)
        try:
            start = time.perf_counter()
            return check(), time.perf_counter() - start
        finally:
            faulthandler.cancel_dump_traceback_later()


def test_pathological_input_is_bounded_on_the_main_thread(capsys):
    result, seconds = _bounded(lambda: is_correct(PATHOLOGICAL, "1", seconds=1), capsys)
    assert result is False
    assert seconds < 60


def test_pathological_input_is_bounded_off_the_main_thread(capsys):
    def in_thread():
        out = {}
        worker = threading.Thread(target=lambda: out.update(value=is_correct(PATHOLOGICAL, "1", seconds=1)))
        worker.start()
        worker.join()
        return out["value"]

    with ThreadPoolExecutor(1) as pool:  # start the helper process first, so the timing below is that of one check
        assert pool.submit(is_correct, "\\boxed{1}", "1").result() is True
    result, seconds = _bounded(in_thread, capsys)
    assert result is False
    assert seconds < 60
    # The stuck helper was replaced: a normal check from a thread still answers.
    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(is_correct, "\\boxed{\\frac{3}{4}}", "0.75").result() is True


# ---------------------------------------------------------------- answer checking


@pytest.mark.parametrize(
    ("response", "gold", "expected"),
    [
        ("The answer is \\boxed{3}.", "3", True),
        ("\\boxed{3}", "4", False),
        ("0.5", "1/2", True),
        ("\\frac{1}{2}", "0.5", True),
        ("So we get \\boxed{\\frac{1}{2}}", "0.5", True),
        ("I could not work it out.", "3", False),
        ("", "3", False),
    ],
)
def test_is_correct_on_short_replies(response, gold, expected):
    assert is_correct(response, gold) is expected
