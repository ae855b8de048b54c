"""Tests for trd_lightning.data.code_rows: rows with the columns of each hub dataset, checked end to end.

Each row is small and hand-written; the expected fields are worked out from it, and its reference program (or one
written here) is run through the checker: the right one must pass, a wrong one must fail.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import zlib

import pytest
from datasets import Dataset

from trd_lightning.data.code_rows import COLUMNS, code_row, mbpp_row
from trd_lightning.verify import CodeVerifier, Limits
from trd_lightning.verify.reference import parse_tests


@pytest.fixture(scope="module")
def verifier():
    return CodeVerifier(max_workers=2, limits=Limits(seconds=2.0, startup_seconds=2.0))


def _fenced(code: str) -> str:
    return f"```python\n{code}\n```"


TACO_STDIO = {
    "question": "Given two integers a and b, print a + b.",
    "solutions": json.dumps(
        ["a, b = map(int, input().split())\nprint(a + b)\n", "print(sum(map(int, input().split())))"]
    ),
    "starter_code": "",
    "input_output": json.dumps({"inputs": ["1 2\n", ["3 4"]], "outputs": ["3\n", ["7"]]}),
    "difficulty": "EASY",
}
TACO_CALL = {
    "question": "Return the sum of a and b.",
    "solutions": json.dumps(["def add(a, b):\n    return a + b\n"]),
    "starter_code": "def add(a, b):\n    ",
    "input_output": json.dumps({"fn_name": "add", "inputs": [[1, 2], [3, 4]], "outputs": [[3], [7]]}),
    "difficulty": "EASY",
}


def test_taco_rows(verifier):
    stdio, call = code_row(TACO_STDIO, "taco"), code_row(TACO_CALL, "taco")
    assert stdio["problem"].startswith(TACO_STDIO["question"]) and "standard input" in stdio["problem"]
    assert stdio["solution"] == json.loads(TACO_STDIO["solutions"])[0]  # y* is the first solution
    tests = parse_tests(stdio["answer"])
    assert tests.harness == "stdio" and tests.cases == (("1 2\n", "3\n"), ("3 4", "7"))  # lists joined by lines
    assert "def add(a, b):" in call["problem"] and "```python" in call["problem"]
    tests = parse_tests(call["answer"])
    assert (tests.harness, tests.fn_name, tests.wrapped) == ("call", "add", True)
    assert tests.cases == (([1, 2], [3]), ([3, 4], [7]))
    wrong = _fenced("a, b = map(int, input().split())\nprint(a - b)")
    responses = [_fenced(stdio["solution"]), wrong, _fenced(call["solution"]), _fenced("def add(a, b):\n    return a")]
    assert verifier(responses, [stdio["answer"], stdio["answer"], call["answer"], call["answer"]]) == [
        True,
        False,
        True,
        False,
    ]
    empty = code_row({**TACO_STDIO, "input_output": "", "solutions": "[]"}, "taco")
    assert empty["answer"] is None and empty["solution"] is None


HUMANEVAL = {
    "task_id": "HumanEval/0",
    "prompt": 'def mean(xs: list) -> float:\n    """The mean of xs.\n    >>> mean([1, 2])\n    1.5\n    """\n',
    "canonical_solution": "    return sum(xs) / len(xs)\n",
    "entry_point": "mean",
    "test": (
        "import numpy as np\n\ndef assertion(out, exp, atol):\n    assert np.allclose(out, exp, atol=atol or 1e-6)\n\n"
        "def check(candidate):\n    inputs = [[[1, 2]], [[1, 1, 2]], [[0.1, 0.2]]]\n"
        "    results = [1.5, 4 / 3, 0.15]\n    for inp, exp in zip(inputs, results):\n"
        "        assertion(candidate(*inp), exp, 0)\n"
    ),
}


def test_humaneval_row(verifier):
    row = code_row(HUMANEVAL, "humaneval")
    assert HUMANEVAL["prompt"].rstrip() in row["problem"]
    assert row["solution"] == HUMANEVAL["prompt"] + HUMANEVAL["canonical_solution"]
    tests = parse_tests(row["answer"])
    assert tests.harness == "assert" and tests.entry_point == "mean"
    assert tests.code.startswith(HUMANEVAL["test"]) and tests.code.rstrip().endswith("check(mean)")
    wrong = "def mean(xs):\n    return sum(xs) // len(xs)\n"
    renamed = "def average(xs):\n    return sum(xs) / len(xs)\n"
    got = verifier([_fenced(row["solution"]), _fenced(wrong), _fenced(renamed)], [row["answer"]] * 3)
    assert got == [True, False, False]


MBPP = {
    "task_id": 2,
    "code": "def similar_elements(a, b):\n    return tuple(set(a) & set(b))\n",
    "prompt": '"""\nWrite a function to find the shared elements from the given two lists.\n'
    'assert set(similar_elements((3, 4, 5, 6), (5, 7, 4, 10))) == set((4, 5))\n"""\n',
    "source_file": "Benchmark Questions Verification V2.ipynb",
    "test_imports": [],
    "test_list": ["assert set(similar_elements((3, 4, 5, 6), (5, 7, 4, 10))) == set((4, 5))"],
    "test": (
        "inputs = [[(3, 4, 5, 6), (5, 7, 4, 10)], [(1, 2), (3,)]]\nresults = [(4, 5), ()]\n"
        "for inp, exp in zip(inputs, results):\n    assert set(similar_elements(*inp)) == set(exp)\n"
    ),
}


def test_mbpp_row(verifier):
    row, base = code_row(MBPP, "mbpp"), mbpp_row(MBPP, plus=False)
    assert row["problem"].startswith("Write a function to find the shared elements") and '"""' not in row["problem"]
    assert row["solution"] == MBPP["code"]
    assert parse_tests(row["answer"]).code == MBPP["test"] + "\n"
    assert parse_tests(base["answer"]).code == MBPP["test_list"][0] + "\n"
    # Right on the original assert only: the MBPP+ tests (its second input) catch it.
    only_base = "def similar_elements(a, b):\n    return (4, 5)\n"
    got = verifier(
        [_fenced(row["solution"]), _fenced(only_base), _fenced(only_base)],
        [row["answer"], row["answer"], base["answer"]],
    )
    assert got == [True, False, True]
    with_imports = code_row({**MBPP, "test_imports": ["import math"], "test": ""}, "mbpp")
    assert parse_tests(with_imports["answer"]).code == "import math\n" + MBPP["test_list"][0] + "\n"


def _lcb_private(cases: list[dict]) -> str:
    return base64.b64encode(zlib.compress(pickle.dumps(json.dumps(cases)))).decode()


LCB_STDIO = {
    "question_title": "Double",
    "question_content": "Read an integer N and print 2N.",
    "platform": "atcoder",
    "starter_code": "",
    "public_test_cases": json.dumps([{"input": "3\n", "output": "6\n", "testtype": "stdin"}]),
    "private_test_cases": _lcb_private(
        [
            {"input": "-5\n", "output": "-10\n", "testtype": "stdin"},
            {"input": "0\n", "output": "0\n", "testtype": "stdin"},
        ]
    ),
    "metadata": "{}",
}
LCB_CALL = {
    "question_title": "Two Sum",
    "question_content": "Return the indices of the two numbers that add up to target.",
    "platform": "leetcode",
    "starter_code": "class Solution:\n    def twoSum(self, nums: List[int], target: int) -> List[int]:\n        ",
    "public_test_cases": json.dumps([{"input": "[2, 7, 11, 15]\n9", "output": "[0, 1]", "testtype": "functional"}]),
    "private_test_cases": json.dumps([{"input": "[3, 2, 4]\n6", "output": "[1, 2]", "testtype": "functional"}]),
    "metadata": json.dumps({"func_name": "twoSum"}),
}


def test_livecodebench_rows(verifier):
    stdio, call = code_row(LCB_STDIO, "livecodebench"), code_row(LCB_CALL, "livecodebench")
    assert stdio["solution"] is None and "standard input" in stdio["problem"]
    assert parse_tests(stdio["answer"]).cases == (("3\n", "6\n"), ("-5\n", "-10\n"), ("0\n", "0\n"))
    tests = parse_tests(call["answer"])
    assert (tests.harness, tests.fn_name) == ("call", "twoSum")
    assert tests.cases == (([[2, 7, 11, 15], 9], [0, 1]), ([[3, 2, 4], 6], [1, 2]))  # one JSON value per line
    assert "class Solution:" in call["problem"]
    solution = (
        "from typing import List\nclass Solution:\n    def twoSum(self, nums: List[int], target: int) -> List[int]:\n"
        "        for i in range(len(nums)):\n            for j in range(i + 1, len(nums)):\n"
        "                if nums[i] + nums[j] == target:\n                    return [i, j]\n"
    )
    first_two = solution.replace("for i in range(len(nums)):", "for i in [0]:")  # right on the public case only
    responses = [_fenced("print(2 * int(input()))"), _fenced("print(abs(2 * int(input())))"), _fenced(solution)]
    responses.append(_fenced(first_two))
    got = verifier(responses, [stdio["answer"], stdio["answer"], call["answer"], call["answer"]])
    assert got == [True, False, True, False]


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_livecodebench_pickle_runs_no_code(tmp_path):
    exploit = _Exploit()
    exploit.path = tmp_path / "pwned"
    row = {**LCB_STDIO, "private_test_cases": base64.b64encode(zlib.compress(pickle.dumps(exploit))).decode()}
    with pytest.raises(ValueError, match="neither JSON nor base64-zlib-pickle"):
        code_row(row, "livecodebench")
    assert not exploit.path.exists()


def test_bad_rows_get_clear_errors():
    with pytest.raises(ValueError, match="row_format must be one of"):
        code_row(TACO_STDIO, "apps")
    with pytest.raises(ValueError, match="lacks \\['input_output'\\]"):
        code_row({k: v for k, v in TACO_STDIO.items() if k != "input_output"}, "taco")
    with pytest.raises(ValueError, match="'input_output' is not JSON"):
        code_row({**TACO_STDIO, "input_output": "{inputs"}, "taco")
    with pytest.raises(ValueError, match="2 inputs but 1 outputs"):
        code_row({**TACO_STDIO, "input_output": json.dumps({"inputs": ["1", "2"], "outputs": ["1"]})}, "taco")
    with pytest.raises(ValueError, match="no func_name"):
        code_row({**LCB_CALL, "metadata": "{}"}, "livecodebench")
    assert set(COLUMNS) == {"taco", "humaneval", "mbpp", "livecodebench"}


def test_rows_through_datasets_map():
    # The data side maps rows with datasets: Arrow hands back lists and strings, and the fields come out as columns.
    dataset = Dataset.from_list([MBPP, {**MBPP, "task_id": 3}])
    mapped = dataset.map(lambda example: code_row(example, "mbpp"), remove_columns=dataset.column_names)
    assert mapped.column_names == ["problem", "solution", "answer"]
    assert mapped[0] == code_row(MBPP, "mbpp")
