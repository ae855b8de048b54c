"""Lenient comparison of a program's results with the expected ones, in the spirit of TACO's and LiveCodeBench's.

stdout: both texts are cut into non-empty lines of whitespace-separated tokens (so trailing spaces, blank lines and
the final newline never matter); lines must agree one to one and token by token, where two tokens agree when equal as
text, equal as integers (``007`` and ``7``), or, when either is not an integer, as numbers within an absolute or
relative error of :data:`FLOAT_TOLERANCE` (``0.3333333`` and ``0.333333``; ``1`` and ``1.0``). Integers are compared
exactly, never through floats: 50000000000000000 and 50000000000000001 differ. Unlike TACO's last resorts, the order of
tokens and lines always matters.

Return values (call-based): lists and tuples element by element, dicts key by key, numbers as above (an int and a
float compare as numbers; booleans by ``==``), anything else by ``==``.
"""

from __future__ import annotations

import math
import re
from typing import Any

FLOAT_TOLERANCE = 1e-6
_INTEGER = re.compile(r"[+-]?\d+")


def _close(a: float, b: float) -> bool:
    return math.isfinite(a) and math.isfinite(b) and abs(a - b) <= FLOAT_TOLERANCE * max(1.0, abs(b))


def _tokens_match(got: str, expected: str) -> bool:
    if got == expected:
        return True
    if _INTEGER.fullmatch(got) and _INTEGER.fullmatch(expected):
        return int(got) == int(expected)
    try:
        return _close(float(got), float(expected))
    except (ValueError, OverflowError):
        return False


def _lines(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines() if line.strip()]


def stdout_matches(got: str, expected: str) -> bool:
    """Whether a program's stdout ``got`` equals ``expected`` under the lenient rule of the module docstring."""
    got_lines, expected_lines = _lines(got), _lines(expected)
    if len(got_lines) != len(expected_lines):
        return False
    for a, b in zip(got_lines, expected_lines):
        if len(a) != len(b) or not all(_tokens_match(x, y) for x, y in zip(a, b)):
            return False
    return True


def values_match(got: Any, expected: Any) -> bool:
    """Whether a returned value (after a JSON round trip) equals ``expected`` under the rule of the module docstring."""
    if isinstance(got, bool) or isinstance(expected, bool):
        return got == expected
    if isinstance(got, (int, float)) and isinstance(expected, (int, float)):
        if isinstance(got, int) and isinstance(expected, int):
            return got == expected
        try:
            return got == expected or _close(float(got), float(expected))
        except OverflowError:  # an int too large for a float, against a float
            return False
    if isinstance(got, (list, tuple)) and isinstance(expected, (list, tuple)):
        return len(got) == len(expected) and all(values_match(a, b) for a, b in zip(got, expected))
    if isinstance(got, dict) and isinstance(expected, dict):
        return got.keys() == expected.keys() and all(values_match(got[k], expected[k]) for k in got)
    return got == expected
