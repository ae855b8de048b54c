"""Answer checking through math-verify: ``\\boxed{}`` answers and plain final answers."""

from __future__ import annotations

import threading

from math_verify import parse, verify


def _timeout(seconds: int) -> int | None:
    # math-verify's timeouts use SIGALRM, which only the main thread may set.
    return seconds if threading.current_thread() is threading.main_thread() else None


def parse_answer(text: str, seconds: int = 5) -> list:
    """The answers math-verify extracts from ``text`` (empty when there is none)."""
    try:
        return parse(text, parsing_timeout=_timeout(seconds))
    except Exception:  # a malformed rollout is a wrong answer, never a crash
        return []


def is_correct(response: str, gold: str, seconds: int = 5) -> bool:
    """Whether the final answer in ``response`` equals ``gold`` (a bare answer such as ``1/2`` or LaTeX)."""
    target = parse_answer(response, seconds)
    reference = parse_answer(gold, seconds) or parse_answer(f"${gold}$", seconds)
    if not target or not reference:
        return False
    try:
        return bool(verify(reference, target, timeout_seconds=_timeout(seconds)))
    except Exception:
        return False
