"""The tests of one code problem as canonical JSON: what a data row stores as ``answer``, and the checker reads.

Three shapes, one per harness (keys sorted, no spaces, ASCII):

- ``{"harness": "stdio", "cases": [{"input": str, "output": str}, ...]}``: each input on stdin, stdout compared
  leniently with the output (see :mod:`trd_lightning.verify.compare`);
- ``{"harness": "call", "fn_name": str, "cases": [{"input": [arg, ...], "output": value}, ...], "wrapped": bool}``:
  the function ``fn_name`` (or the method of that name of a ``class Solution``) called with each argument list, its
  return value compared with the output; ``wrapped`` also accepts a value equal to the first element of a list output
  (TACO stores outputs as one-element lists);
- ``{"harness": "assert", "code": str, "entry_point": str | null}``: test code run after the program in its
  namespace (MBPP's asserts; HumanEval's ``check`` definition, then ``check(entry_point)``); passing means it ran to
  its end.

Build them with :func:`stdio_tests`, :func:`call_tests` and :func:`assert_tests`; :func:`parse_tests` reads them back.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

HARNESSES = ("stdio", "call", "assert")


@dataclass(frozen=True)
class Tests:
    """Parsed tests of one problem.

    Attributes:
        harness: ``"stdio"``, ``"call"`` or ``"assert"``.
        cases: ``(input, output)`` pairs (stdio and call).
        fn_name: The function to call (call).
        wrapped: Accept a return value equal to the first element of a list output (call).
        code: The test code (assert).
        entry_point: A function the program must define before the tests run (assert), or None.
    """

    harness: str
    cases: tuple[tuple[Any, Any], ...] = ()
    fn_name: str | None = None
    wrapped: bool = False
    code: str | None = None
    entry_point: str | None = None


def _dump(tests: dict) -> str:
    return json.dumps(tests, sort_keys=True, separators=(",", ":"))


def stdio_tests(cases: Iterable[tuple[str, str]]) -> str:
    """The canonical JSON of stdin/stdout tests from ``(input, output)`` text pairs."""
    return _dump({"harness": "stdio", "cases": [{"input": i, "output": o} for i, o in cases]})


def call_tests(fn_name: str, cases: Iterable[tuple[list, Any]], wrapped: bool = False) -> str:
    """The canonical JSON of call-based tests from ``(arguments, output)`` pairs (JSON-serialisable values)."""
    cases = [{"input": list(args), "output": output} for args, output in cases]
    return _dump({"harness": "call", "fn_name": fn_name, "cases": cases, "wrapped": wrapped})


def assert_tests(code: str, entry_point: str | None = None) -> str:
    """The canonical JSON of assert-style tests: ``code`` runs after the program, ``entry_point`` must exist first."""
    return _dump({"harness": "assert", "code": code, "entry_point": entry_point})


@functools.lru_cache(maxsize=1024)  # a validation checks k samples against the same reference
def parse_tests(text: str) -> Tests:
    """Read a reference written by the builders above.

    Raises:
        ValueError: When ``text`` is not such JSON, naming what is wrong.
    """
    hint = "build code references with trd_lightning.data.code_rows or trd_lightning.verify.reference"
    try:
        data = json.loads(text)
    except (TypeError, json.JSONDecodeError) as error:
        raise ValueError(f"a code reference must be tests JSON ({hint}); got {str(text)[:80]!r}: {error}") from None
    harness = data.get("harness") if isinstance(data, dict) else None
    if harness not in HARNESSES:
        raise ValueError(f"a code reference needs 'harness' in {HARNESSES} ({hint}); got {str(text)[:80]!r}")
    if harness == "assert":
        if not isinstance(data.get("code"), str) or not data["code"].strip():
            raise ValueError(f"assert tests need non-empty 'code' ({hint})")
        return Tests("assert", code=data["code"], entry_point=data.get("entry_point"))
    cases = data.get("cases")
    if not isinstance(cases, list) or not cases:
        raise ValueError(
            f"{harness} tests need a non-empty 'cases' list ({hint}); rows without tests cannot be checked"
        )
    if harness == "stdio":
        if not all(
            isinstance(c, dict) and isinstance(c.get("input"), str) and isinstance(c.get("output"), str) for c in cases
        ):
            raise ValueError(f"stdio cases need text 'input' and 'output' ({hint})")
        return Tests("stdio", cases=tuple((c["input"], c["output"]) for c in cases))
    if not isinstance(data.get("fn_name"), str) or not all(
        isinstance(c, dict) and isinstance(c.get("input"), list) for c in cases
    ):
        raise ValueError(f"call tests need 'fn_name' and argument lists as 'input' ({hint})")
    cases = tuple((c["input"], c.get("output")) for c in cases)
    return Tests("call", cases=cases, fn_name=data["fn_name"], wrapped=bool(data.get("wrapped")))
