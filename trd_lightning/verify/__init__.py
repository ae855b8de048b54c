"""Verifiers: math answers (math-verify) and generated Python programs (sandboxed runs against tests).

Both kinds share one call form, ``verifier(responses, references) -> list[bool]``: for math the references are the
gold answers, for code the tests JSON of :mod:`trd_lightning.verify.reference`. :func:`make_verifier` is the one place
where a task kind selects its verifier.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from trd_lightning.verify.code import CodeVerifier, extract_program
from trd_lightning.verify.harness import Verdict
from trd_lightning.verify.math import MathVerifier, is_correct, parse_answer
from trd_lightning.verify.sandbox import Limits

TASKS = ("math", "code", "none")


class Verifier(Protocol):
    """Anything that judges a batch of responses against references, one bool per pair."""

    def __call__(self, responses: Sequence[str], references: Sequence[str]) -> list[bool]: ...


def make_verifier(task: str, **options) -> Verifier | None:
    """The verifier of a task kind.

    Args:
        task: ``"math"`` (:class:`MathVerifier`), ``"code"`` (:class:`CodeVerifier`) or ``"none"`` (None: nothing
            is checked).
        **options: Passed to the chosen class (``seconds`` for math; ``max_workers``, ``limits``, ``isolation`` for
            code).

    Raises:
        ValueError: For an unknown task, or options given with ``"none"``.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if task == "none":
        if options:
            raise ValueError(f"task='none' checks nothing and takes no options, got {sorted(options)}")
        return None
    return MathVerifier(**options) if task == "math" else CodeVerifier(**options)


__all__ = [
    "TASKS",
    "CodeVerifier",
    "Limits",
    "MathVerifier",
    "Verdict",
    "Verifier",
    "extract_program",
    "is_correct",
    "make_verifier",
    "parse_answer",
]
