"""The demo world's task: chained last-digit arithmetic with every step written out.

A problem is a start digit followed by 3 to 5 operations (``+``, ``-``, ``*`` with a digit), evaluated left
to right keeping only the last digit. The worked solution writes one line per step and ends with a boxed
answer, so answers are checkable and an early wrong step visibly poisons every later one: the prefix
failure that TRD targets, in miniature.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

OPS = ("+", "-", "*")
MIN_STEPS = 3
MAX_STEPS = 5

# Short prompt templates for the demo world (the library's defaults are long English instructions, which
# would triple the tokens per step on a CPU). The demo configs set these; the demo models learn them.
TEMPLATES = {
    "student": "{problem}",
    "privileged": "{problem}\nReference:\n{solution}",
    "refine_opd": "{problem}\nDraft:\n{initial}\nFix the draft.",
    "refine_opsd": "{problem}\nReference:\n{solution}\nDraft:\n{initial}\nFix the draft.",
}


@dataclass(frozen=True)
class Problem:
    """One chained last-digit problem."""

    start: int
    steps: tuple[tuple[str, int], ...]

    @property
    def text(self) -> str:
        expr = " ".join([str(self.start)] + [f"{op} {d}" for op, d in self.steps])
        return f"Last digit, left to right: {expr}"

    def values(self) -> list[int]:
        """The running value after each step."""
        out, value = [], self.start
        for op, digit in self.steps:
            value = apply(value, op, digit)
            out.append(value)
        return out

    @property
    def answer(self) -> str:
        return str(self.values()[-1])

    def solution(self, values: list[int] | None = None) -> str:
        """The worked solution; ``values`` overrides the running values (to write a wrong one)."""
        values = self.values() if values is None else values
        lines, prev = [], self.start
        for (op, digit), value in zip(self.steps, values):
            lines.append(f"{prev} {op} {digit} = {value}")
            prev = value
        lines.append(f"Answer: \\boxed{{{values[-1]}}}")
        return "\n".join(lines)


def apply(value: int, op: str, digit: int) -> int:
    """One step of last-digit arithmetic."""
    if op == "+":
        return (value + digit) % 10
    if op == "-":
        return (value - digit) % 10
    return (value * digit) % 10


def sample_problem(rng: random.Random) -> Problem:
    """A uniformly random problem."""
    n = rng.randint(MIN_STEPS, MAX_STEPS)
    return Problem(rng.randint(0, 9), tuple((rng.choice(OPS), rng.randint(0, 9)) for _ in range(n)))


def flawed_solution(problem: Problem, rng: random.Random) -> str:
    """A solution with one wrong step, every later step computed correctly from the wrong value.

    This is what a student's failed rollout looks like here, and what the refiners learn to repair.
    """
    values = problem.values()
    at = rng.randrange(len(values))
    wrong = (values[at] + rng.randint(1, 9)) % 10
    out = values[:at] + [wrong]
    prev = wrong
    for op, digit in problem.steps[at + 1 :]:
        prev = apply(prev, op, digit)
        out.append(prev)
    return problem.solution(out)


def make_rows(n: int, seed: int) -> list[dict[str, str]]:
    """``n`` dataset rows with ``problem``, ``solution`` and ``answer`` columns."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        p = sample_problem(rng)
        rows.append({"problem": p.text, "solution": p.solution(), "answer": p.answer})
    return rows
