"""Checking generated Python programs: extraction from a response, and a bounded pool of sandboxed runs.

A response's program is its last fenced block tagged ``python``, ``python3`` or ``py``, or untagged (an unclosed fence
at the end, as a reply cut at the token limit leaves it, counts); without one, the whole response. Each program then
runs against its tests as :mod:`trd_lightning.verify.harness` describes, inside :mod:`trd_lightning.verify.sandbox`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from trd_lightning.verify.harness import Verdict, run_tests
from trd_lightning.verify.reference import parse_tests
from trd_lightning.verify.sandbox import ISOLATIONS, Limits, resolve_isolation

# A fence: three backticks, a tag (group 1 a python one, group 2 any other, empty when untagged), the rest of the line,
# then the body up to the next three backticks or the end of the text.
_FENCE = re.compile(r"```[ \t]*(?:(python3?|py)(?![\w+#-])|([^\s`]*))[^\n]*\n(.*?)(?:```|\Z)", re.S | re.I)


def extract_program(response: str) -> str:
    """The program in ``response``: its last python (or untagged) fenced block, else the whole response."""
    blocks = [m.group(3) for m in _FENCE.finditer(response) if m.group(1) or not m.group(2)]
    return blocks[-1] if blocks else response


class CodeVerifier:
    """Checks responses holding Python programs against their tests, many at once.

    ``verifier(responses, references)`` gives one bool per pair, like :class:`trd_lightning.verify.MathVerifier`;
    :meth:`check` gives the verdicts with their reasons. Pairs run concurrently on ``max_workers`` threads, each
    driving one sandboxed subprocess at a time, so a step's rollouts or a validation's k samples are checked together.

    Args:
        max_workers: Programs run at once; None: the CPUs this process may use.
        limits: Resources of each run (:class:`trd_lightning.verify.sandbox.Limits`); None: the defaults.
        isolation: ``"auto"`` (bubblewrap where it runs, else the plain process with a warning), ``"bwrap"`` (an
            error where it cannot run) or ``"process"``; see :mod:`trd_lightning.verify.sandbox` for what each
            guarantees.
    """

    def __init__(self, max_workers: int | None = None, limits: Limits | None = None, isolation: str = "auto") -> None:
        if max_workers is not None and max_workers < 1:
            raise ValueError(f"max_workers must be at least 1 or None, got {max_workers}")
        if isolation not in ISOLATIONS:
            raise ValueError(f"isolation must be one of {ISOLATIONS}, got {isolation!r}")
        self.max_workers = max_workers or len(os.sched_getaffinity(0))
        self.limits = limits or Limits()
        self.requested_isolation = isolation
        self._isolation: str | None = None

    @property
    def isolation(self) -> str:
        """The isolation in use, ``"bwrap"`` or ``"process"`` (resolved, with its trial run, on first use)."""
        if self._isolation is None:
            self._isolation = resolve_isolation(self.requested_isolation)
        return self._isolation

    def check(self, responses: Sequence[str], references: Sequence[str]) -> list[Verdict]:
        """The verdict of each response against the tests in the reference at the same position.

        Args:
            responses: Model replies, each holding one program.
            references: Tests JSON (:mod:`trd_lightning.verify.reference`), one per response.

        Raises:
            ValueError: If the lengths differ or a reference is not tests JSON (before any program runs).
        """
        if len(responses) != len(references):
            raise ValueError(f"got {len(responses)} responses but {len(references)} references")
        tests = [parse_tests(reference) for reference in references]
        isolation = self.isolation
        with ThreadPoolExecutor(min(self.max_workers, max(1, len(tests)))) as pool:
            jobs = [
                pool.submit(run_tests, extract_program(r), t, self.limits, isolation) for r, t in zip(responses, tests)
            ]
            return [job.result() for job in jobs]

    def __call__(self, responses: Sequence[str], references: Sequence[str]) -> list[bool]:
        """Whether each response passes all tests of its reference."""
        return [verdict.passed for verdict in self.check(responses, references)]
