"""The three harnesses: run one program against its tests in the sandbox and give a verdict.

Process model:

- stdin/stdout: a fresh process per test case (a program's state never leaks from one case into the next), in order,
  stopping at the first failing case; each process has ``Limits.seconds`` plus ``Limits.startup_seconds``.
- call-based: one process calls the function on every case (``Limits.seconds`` each, by an alarm inside, and the sum
  plus the startup time outside); its results are compared in the trainer as they arrive, and the run is stopped at
  the first wrong one. The expected outputs never enter the sandbox.
- assert-style: two interpreters at once, one deadline (``Limits.seconds`` plus the startup time) for both, the same
  limits and isolation for each: the program's, which loads ``solution.py`` and answers calls, and the judge's, which
  runs the test code and never the program's code. Every call the tests make into the program (the entry point, the
  functions they name, methods of a class such as ``Solution``) crosses a socket between the two as plain data
  (``_wire.py``), and comes back as fresh builtin objects, so the tests' comparisons are the builtins'. The pass token
  lives only in the judge, and the verdict is read from the judge's output alone. The whole test code gets one
  deadline: raise ``Limits.seconds`` for suites of many slow cases.
"""

from __future__ import annotations

import json
import secrets
import signal
import socket
from dataclasses import dataclass
from pathlib import Path

from trd_lightning.verify.compare import stdout_matches, values_match
from trd_lightning.verify.reference import Tests
from trd_lightning.verify.sandbox import Job, Limits, Run, run_python, run_together

PASSED, WRONG_ANSWER, RUNTIME_ERROR, TIMEOUT, OUTPUT_LIMIT = (
    "passed",
    "wrong_answer",
    "runtime_error",
    "timeout",
    "output_limit",
)
_HERE = Path(__file__).parent
_CALL_DRIVER = (_HERE / "_call_driver.py").read_text()
_WIRE = (_HERE / "_wire.py").read_text()
_JUDGE_DRIVER = _WIRE + (_HERE / "_judge_driver.py").read_text()
_PROGRAM_DRIVER = _WIRE + (_HERE / "_program_driver.py").read_text()


@dataclass(frozen=True)
class Verdict:
    """The outcome of checking one program.

    Attributes:
        passed: Every test case passed.
        status: ``"passed"``, ``"wrong_answer"``, ``"runtime_error"``, ``"timeout"`` or ``"output_limit"``.
        detail: A short human-readable reason (the failing case, the error's last line).
    """

    passed: bool
    status: str
    detail: str = ""


def _failure(run: Run, case: str) -> Verdict | None:
    """The verdict of a run that did not finish normally, or None when it exited with status 0."""
    if run.output_exceeded:
        return Verdict(False, OUTPUT_LIMIT, f"{case}: more output than the limit")
    if run.out_of_time:
        return Verdict(False, TIMEOUT, f"{case}: out of time")
    if run.returncode != 0:
        lines = run.stderr.decode("utf-8", "replace").strip().splitlines()
        status = WRONG_ANSWER if lines and lines[-1].startswith("AssertionError") else RUNTIME_ERROR
        return Verdict(False, status, f"{case}: exit status {run.returncode}: {lines[-1] if lines else ''}"[:300])
    return None


def run_tests(program: str, tests: Tests, limits: Limits, isolation: str) -> Verdict:
    """Check ``program`` against ``tests`` (see the module docstring for how each harness runs).

    Args:
        program: Python source.
        tests: Parsed tests (:func:`trd_lightning.verify.reference.parse_tests`).
        limits: Resources of each run.
        isolation: ``"bwrap"`` or ``"process"``.
    """
    if tests.harness == "stdio":
        return _stdio(program, tests, limits, isolation)
    if tests.harness == "call":
        return _call(program, tests, limits, isolation)
    return _assert(program, tests, limits, isolation)


def _stdio(program: str, tests: Tests, limits: Limits, isolation: str) -> Verdict:
    seconds = limits.seconds + limits.startup_seconds
    for index, (given, expected) in enumerate(tests.cases):
        run = run_python({"solution.py": program}, "solution.py", limits, seconds, isolation, stdin=given)
        failure = _failure(run, f"case {index}")
        if failure is not None:
            return failure
        if not stdout_matches(run.stdout.decode("utf-8", "replace"), expected):
            return Verdict(False, WRONG_ANSWER, f"case {index}: output differs")
    return Verdict(True, PASSED)


class _CallJudge:
    """Compares the driver's result lines with the expected outputs as they arrive; False stops the run."""

    def __init__(self, tests: Tests) -> None:
        self.tests, self.checked, self.offset, self.failure = tests, 0, 0, None

    def __call__(self, stdout: bytes) -> bool:
        while (end := stdout.find(b"\n", self.offset)) >= 0:
            line, self.offset = stdout[self.offset : end], end + 1
            self.failure = self._judge(line)
            if self.failure is not None:
                return False
            self.checked += 1
        return True

    def _judge(self, line: bytes) -> Verdict | None:
        case = f"case {self.checked}"
        if self.checked >= len(self.tests.cases):
            return Verdict(False, WRONG_ANSWER, "more results than cases")
        try:
            result = json.loads(line)
        except json.JSONDecodeError:
            return Verdict(False, WRONG_ANSWER, f"{case}: unreadable result")
        if not isinstance(result, dict) or ("value" not in result and "error" not in result):
            return Verdict(False, WRONG_ANSWER, f"{case}: unreadable result")
        if "error" in result:
            status = TIMEOUT if result["error"] == "timeout" else RUNTIME_ERROR
            return Verdict(False, status, f"{case}: {result['error']}"[:300])
        expected, value = self.tests.cases[self.checked][1], result["value"]
        wrapped = self.tests.wrapped and isinstance(expected, list) and expected and values_match(value, expected[0])
        if not (values_match(value, expected) or wrapped):
            return Verdict(False, WRONG_ANSWER, f"{case}: wrong return value")
        return None


def _call(program: str, tests: Tests, limits: Limits, isolation: str) -> Verdict:
    spec = {"fn_name": tests.fn_name, "inputs": [args for args, _ in tests.cases], "seconds": limits.seconds}
    files = {"solution.py": program, "main.py": _CALL_DRIVER, "harness.json": json.dumps(spec)}
    judge = _CallJudge(tests)
    seconds = limits.startup_seconds + limits.seconds * len(tests.cases)
    run = run_python(files, "main.py", limits, seconds, isolation, watch=judge)
    if judge.failure is not None:
        return judge.failure
    failure = _failure(run, f"case {judge.checked}")
    if failure is not None:
        return failure
    if judge.checked != len(tests.cases):
        return Verdict(False, RUNTIME_ERROR, f"results for {judge.checked} of {len(tests.cases)} cases")
    return Verdict(True, PASSED)


def _assert(program: str, tests: Tests, limits: Limits, isolation: str) -> Verdict:
    token = secrets.token_hex(16)
    judge_end, program_end = (end.detach() for end in socket.socketpair())  # run_together closes them once passed
    common = {"max_bytes": limits.output_bytes}
    judge = Job(
        {
            "main.py": _JUDGE_DRIVER,
            "harness.json": json.dumps(
                {**common, "fd": judge_end, "token": token, "code": tests.code, "entry_point": tests.entry_point}
            ),
        },
        "main.py",
        pass_fds=(judge_end,),
    )
    solution = Job(
        {"solution.py": program, "main.py": _PROGRAM_DRIVER, "harness.json": json.dumps({**common, "fd": program_end})},
        "main.py",
        pass_fds=(program_end,),
    )
    judged, ran = run_together([judge, solution], limits, limits.startup_seconds + limits.seconds, isolation)
    return _assert_verdict(judged, ran, token)


def _assert_verdict(judged: Run, ran: Run, token: str) -> Verdict:
    """The verdict from the judge's line; the program's own output is never read for it."""
    for run, who in ((judged, "tests"), (ran, "program")):
        if run.output_exceeded:
            return Verdict(False, OUTPUT_LIMIT, f"{who}: more output than the limit")
    if judged.timed_out or judged.returncode == -signal.SIGXCPU:  # a SIGKILL is told apart: the judge was killed
        return Verdict(False, TIMEOUT, "tests: out of time")
    lines = judged.stdout.decode("utf-8", "replace").strip().splitlines()
    try:
        outcome = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        outcome = None
    if not isinstance(outcome, dict) or outcome.get("status") not in (PASSED, WRONG_ANSWER, RUNTIME_ERROR):
        errors = judged.stderr.decode("utf-8", "replace").strip().splitlines()
        detail = f"tests: exit status {judged.returncode}" + (f": {errors[-1]}" if errors else "")
        return Verdict(False, RUNTIME_ERROR, f"the judge ended without a verdict ({detail})"[:300])
    if outcome["status"] == PASSED:
        if outcome.get("token") != token or judged.returncode != 0:
            return Verdict(False, RUNTIME_ERROR, "the judge's verdict does not carry its token")
        return Verdict(True, PASSED)
    detail = str(outcome.get("detail", ""))
    if outcome.get("program_ended"):  # say how the program ended: its exit status, its last error line
        if ran.out_of_time:
            return Verdict(False, TIMEOUT, f"program: out of time ({detail})"[:300])
        errors = ran.stderr.decode("utf-8", "replace").strip().splitlines()
        detail += f": exit status {ran.returncode}" + (f": {errors[-1]}" if errors else "")
    return Verdict(False, outcome["status"], f"tests: {detail}"[:300])
