"""Row formats of code datasets: a hub row to the fields the data side uses.

Each format turns one row (a mapping of the hub dataset's columns) into ``problem`` (the text shown to the model,
ending with how to give the answer), ``solution`` (the reference program y*, or None) and ``answer`` (the tests as the
canonical JSON of :mod:`trd_lightning.verify.reference`, or None when the row has none):

- ``taco`` (BAAI/TACO): ``question``, ``solutions`` (JSON list of programs; y* is the first), ``starter_code``,
  ``input_output`` (JSON ``{inputs, outputs, fn_name?}``: stdin/stdout, or call-based with ``fn_name``, whose
  outputs TACO wraps in one-element lists);
- ``humaneval`` (HumanEval+, evalplus/humanevalplus): ``prompt``, ``entry_point``, ``test`` defining
  ``check(candidate)``, ``canonical_solution`` (the body under the prompt);
- ``mbpp`` (MBPP+, evalplus/mbppplus): ``prompt``, ``test_list`` (assert strings), ``test_imports``, ``test`` (the
  extended MBPP+ tests, used when present), ``code`` (the reference);
- ``livecodebench`` (livecodebench/code_generation_lite): ``question_content``, ``starter_code``,
  ``public_test_cases`` and ``private_test_cases`` (JSON lists of ``{input, output, testtype}``; the private ones may
  be base64 of zlib of a pickled JSON string), ``metadata`` (JSON, ``func_name`` for LeetCode's ``class Solution``).
"""

from __future__ import annotations

import base64
import io
import json
import pickle
import zlib
from collections.abc import Callable, Mapping
from typing import Any

from lightning.pytorch.utilities import rank_zero_info

from trd_lightning.verify.reference import assert_tests, call_tests, stdio_tests

_STDIO_FORMAT = (
    "Write a Python program that reads the input from standard input and prints the answer to standard output. "
    "Give the whole program in one ```python code block."
)
_CALL_FORMAT = "Write the solution in Python, starting from this code, and give it in one ```python code block:"
_FUNCTION_FORMAT = "Give the whole function, with any imports it needs, in one ```python code block."


def _with_format(question: str, starter_code: str | None) -> str:
    if starter_code and starter_code.strip():
        return f"{question.strip()}\n\n{_CALL_FORMAT}\n```python\n{starter_code.rstrip()}\n```"
    return f"{question.strip()}\n\n{_STDIO_FORMAT}"


def _json(example: Mapping[str, Any], column: str, row_format: str):
    value = example[column]
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value) if value.strip() else None
    except json.JSONDecodeError as error:
        raise ValueError(f"{row_format} row: column {column!r} is not JSON ({error}): {value[:80]!r}") from None


def _text(value: Any) -> str:
    return "\n".join(str(v) for v in value) if isinstance(value, list) else str(value)


def taco_row(example: Mapping[str, Any]) -> dict[str, str | None]:
    """A BAAI/TACO row (see the module docstring)."""
    solutions = _json(example, "solutions", "taco") or []
    io_spec = _json(example, "input_output", "taco") or {}
    inputs, outputs = io_spec.get("inputs") or [], io_spec.get("outputs") or []
    if len(inputs) != len(outputs):
        raise ValueError(f"taco row: input_output has {len(inputs)} inputs but {len(outputs)} outputs")
    answer = None
    if inputs and io_spec.get("fn_name"):
        cases = [(args if isinstance(args, list) else [args], out) for args, out in zip(inputs, outputs)]
        answer = call_tests(io_spec["fn_name"], cases, wrapped=True)
    elif inputs:
        answer = stdio_tests((_text(i), _text(o)) for i, o in zip(inputs, outputs))
    return {
        "problem": _with_format(example["question"], example.get("starter_code")),
        "solution": solutions[0] if solutions else None,
        "answer": answer,
    }


def humaneval_row(example: Mapping[str, Any]) -> dict[str, str | None]:
    """A HumanEval+ row: the tests are ``test`` followed by ``check(entry_point)``."""
    prompt, entry_point = example["prompt"], example["entry_point"]
    solution = example.get("canonical_solution")
    return {
        "problem": f"Complete this Python function. {_FUNCTION_FORMAT}\n```python\n{prompt.rstrip()}\n```",
        "solution": prompt + solution if solution else None,
        "answer": assert_tests(f"{example['test']}\n\ncheck({entry_point})\n", entry_point),
    }


def mbpp_row(example: Mapping[str, Any], plus: bool = True) -> dict[str, str | None]:
    """An MBPP+ row.

    Args:
        example: The row.
        plus: Test with the extended ``test`` column where the row has one; False: only the ``test_list`` asserts.
    """
    plus_tests = example.get("test") if plus else None
    tests = plus_tests if plus_tests and plus_tests.strip() else "\n".join(example["test_list"])
    imports = "\n".join(example.get("test_imports") or [])
    task = example["prompt"].strip().strip('"').strip()
    return {
        "problem": f"{task}\n\nWrite this Python function. {_FUNCTION_FORMAT}",
        "solution": example.get("code") or None,
        "answer": assert_tests(f"{imports}\n{tests}\n" if imports else f"{tests}\n"),
    }


class _TextOnly(pickle.Unpickler):
    """Unpickles plain data only: a dataset's pickle naming any class or function is refused, never run."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"livecodebench tests may hold only JSON text, not {module}.{name}")


def _lcb_cases(value: str) -> list[dict]:
    if not value or not value.strip():
        return []
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        pass
    try:
        text = _TextOnly(io.BytesIO(zlib.decompress(base64.b64decode(value)))).load()
        return json.loads(text)
    except (ValueError, zlib.error, pickle.UnpicklingError, EOFError, TypeError) as error:
        raise ValueError(
            f"livecodebench row: test cases are neither JSON nor base64-zlib-pickle JSON: {error}"
        ) from None


def livecodebench_row(example: Mapping[str, Any]) -> dict[str, str | None]:
    """A LiveCodeBench code_generation_lite row: public then private cases; call-based when ``func_name`` is set."""
    cases = _lcb_cases(example["public_test_cases"]) + _lcb_cases(example["private_test_cases"])
    metadata = _json(example, "metadata", "livecodebench") or {}
    fn_name = metadata.get("func_name")
    kinds = {case.get("testtype") for case in cases}
    if kinds - {"stdin", "functional"} or len(kinds) > 1:
        raise ValueError(f"livecodebench row: expected one testtype, 'stdin' or 'functional', got {sorted(kinds)}")
    if kinds == {"functional"} and not fn_name:
        raise ValueError("livecodebench row: functional tests but no func_name in metadata")
    answer = None
    if kinds == {"functional"}:
        parsed = [([json.loads(line) for line in c["input"].split("\n")], json.loads(c["output"])) for c in cases]
        answer = call_tests(fn_name, parsed)
    elif cases:
        answer = stdio_tests((c["input"], c["output"]) for c in cases)
    return {
        "problem": _with_format(example["question_content"], example.get("starter_code")),
        "solution": None,
        "answer": answer,
    }


ROW_FORMATS: dict[str, Callable[[Mapping[str, Any]], dict[str, str | None]]] = {
    "taco": taco_row,
    "humaneval": humaneval_row,
    "mbpp": mbpp_row,
    "livecodebench": livecodebench_row,
}
COLUMNS = {
    "taco": ("question", "solutions", "input_output"),
    "humaneval": ("prompt", "entry_point", "test"),
    "mbpp": ("prompt", "test_list"),
    "livecodebench": ("question_content", "public_test_cases", "private_test_cases", "metadata"),
}


def code_row(example: Mapping[str, Any], row_format: str) -> dict[str, str | None]:
    """``problem``, ``solution`` and ``answer`` of one row in the named format.

    Raises:
        ValueError: For an unknown format, a row without the format's required columns (:data:`COLUMNS`), or
            malformed tests.
    """
    if row_format not in ROW_FORMATS:
        raise ValueError(f"row_format must be one of {sorted(ROW_FORMATS)}, got {row_format!r}")
    missing = [column for column in COLUMNS[row_format] if column not in example]
    if missing:
        raise ValueError(
            f"a {row_format} row needs the columns {list(COLUMNS[row_format])}; this one lacks {missing} "
            f"(it has {sorted(example)})"
        )
    return ROW_FORMATS[row_format](example)


def code_dataset(dataset, code_format: str, source: str):
    """A code dataset (``datasets.Dataset``) as rows of problem, reference program and tests, through ``datasets.map``;
    rows without tests are dropped and counted. ``source`` names the dataset in messages."""
    missing = [c for c in COLUMNS[code_format] if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"Dataset {source!r} lacks the columns {missing} of code_format: {code_format} (it has "
            f"{dataset.column_names}): pick the format of the dataset's hub card, or map its columns."
        )
    rows = dataset.map(lambda row: code_row(row, code_format), remove_columns=dataset.column_names)
    kept = rows.filter(lambda row: row["answer"] is not None)
    if len(kept) < len(rows):
        rank_zero_info(f"[trd] {source!r}: dropped {len(rows) - len(kept)} of {len(rows)} rows without tests")
    return kept
